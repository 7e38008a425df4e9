//! Placement, leases, fencing and drain with real coordinators and agents (issue 3).

use std::time::Duration;

use drover_proto::pb;
use drover_proto::pb::agent_message::Msg as In;
use drover_proto::pb::coordinator_message::Msg as Out;
use drover_tests::{Cluster, ClusterOptions, shell_task, submit_task, wait_done, wait_for};

const TEST_DEADLINE: Duration = Duration::from_secs(150);

fn expr(text: &str) -> pb::LabelExpression {
    drover_proto::selector::parse(text).unwrap()
}

async fn task_of(client: &drover_proto::client::ClusterClient, run_id: &str) -> Option<pb::Task> {
    droverctl::cli::get_run(client, run_id)
        .await
        .ok()
        .map(|r| r.tasks[0].clone())
}

fn fast_leases() -> ClusterOptions {
    ClusterOptions {
        lease_ttl_ms: 2_000,
        heartbeat_interval_ms: 300,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_labels_place_tasks_only_on_matching_agents() {
    // Guards: affinity.required is honoured end to end, with reasons for what cannot match.
    tokio::time::timeout(TEST_DEADLINE, async {
        let mut cluster = Cluster::start(ClusterOptions::default()).await;
        cluster.add_agent("in-a", &["--labels", "zone=a"]).await;
        cluster.add_agent("in-b", &["--labels", "zone=b"]).await;
        let client = cluster.client();
        let mut ids = Vec::new();
        for _ in 0..6 {
            let mut t = shell_task("true");
            t.required = vec![expr("zone = a")];
            ids.push(submit_task(&client, t).await);
        }
        for id in &ids {
            let run = wait_done(&client, id, Duration::from_secs(30)).await;
            assert_eq!(run.tasks[0].agent, "in-a");
            assert_eq!(run.state, pb::RunState::Succeeded as i32);
        }
        // A requirement nothing satisfies stays pending and says why.
        let mut t = shell_task("true");
        t.required = vec![expr("zone = c")];
        let id = submit_task(&client, t).await;
        let task = wait_for("a pending reason", Duration::from_secs(10), || async {
            task_of(&client, &id)
                .await
                .filter(|t| !t.pending_reason.is_empty() && t.pending_reason.contains("zone = c"))
        })
        .await;
        assert_eq!(
            task.pending_reason,
            "2 agents in class default, none matching `zone = c`"
        );
        // droverctl shows the reason.
        let out = cluster.ctl().args(["run", "get", &id]).output().unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("none matching `zone = c`"));
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_too_big_for_every_agent_waits_with_a_reason_and_runs_when_one_fits() {
    // Guards: unplaceable tasks stay pending (not failed), explained, and are placed when capacity joins.
    tokio::time::timeout(TEST_DEADLINE, async {
        let mut cluster = Cluster::start(ClusterOptions::default()).await;
        cluster
            .add_agent("small", &["--resources", "cpu=2,memory=1Gi"])
            .await;
        let client = cluster.client();
        let mut t = shell_task("echo big");
        t.resources = Some(pb::Resources {
            cpu_millis: 8_000,
            memory_bytes: 512 << 20,
            ..Default::default()
        });
        let id = submit_task(&client, t).await;
        let task = wait_for("the pending reason", Duration::from_secs(10), || async {
            task_of(&client, &id)
                .await
                .filter(|t| t.pending_reason.contains("cpu"))
        })
        .await;
        assert_eq!(task.state, pb::TaskState::Pending as i32);
        assert_eq!(
            task.pending_reason,
            "1 agent in class default, none with enough free cpu 8000m (most free: 2000m)"
        );
        cluster.start_agent("large", &["--resources", "cpu=16,memory=8Gi"]);
        let run = wait_done(&client, &id, Duration::from_secs(30)).await;
        assert_eq!(run.state, pb::RunState::Succeeded as i32);
        assert_eq!(run.tasks[0].agent, "large");
        // `agent get` shows capacity; nothing is left placed on it.
        let large = cluster.agent("large").await.unwrap();
        assert_eq!(large.agent.unwrap().total.unwrap().cpu_millis, 16_000);
        assert!(large.tasks.is_empty());
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agents_task_reruns_elsewhere_and_its_late_result_is_refused() {
    // Guards: lease expiry -> lost -> re-queued as attempt 2; the attempt is a fencing token.
    tokio::time::timeout(TEST_DEADLINE, async {
        let mut cluster = Cluster::start(fast_leases()).await;
        cluster.add_agent("doomed", &[]).await;
        let orphan_pid_file = cluster.path().join("attempt-1.pid");
        let client = cluster.client();
        // Attempt 1 sleeps (its PID is recorded so the test can stop it); attempt 2 finishes at once.
        let id = submit_task(
            &client,
            shell_task(
                &format!(
                    r#"if [ "$DROVER_ATTEMPT" = 1 ]; then echo $$ > {}; exec sleep 4; fi; echo "attempt $DROVER_ATTEMPT""#,
                    orphan_pid_file.display()
                ),
            ),
        )
        .await;
        wait_for(
            "attempt 1 running on doomed",
            Duration::from_secs(20),
            || async {
                task_of(&client, &id)
                    .await
                    .filter(|t| t.state == pb::TaskState::Running as i32 && t.agent == "doomed")
            },
        )
        .await;
        cluster.kill_agent("doomed");
        cluster.start_agent("survivor", &[]);
        let run = wait_done(&client, &id, Duration::from_secs(30)).await;
        let task = &run.tasks[0];
        assert_eq!(run.state, pb::RunState::Succeeded as i32);
        assert_eq!((task.attempt, task.agent.as_str()), (2, "survivor"));
        assert_eq!(
            String::from_utf8_lossy(&task.outcome.as_ref().unwrap().stdout_tail),
            "attempt 2\n"
        );
        let doomed = cluster.agent("doomed").await.unwrap().agent.unwrap();
        assert_eq!(doomed.state, pb::AgentState::Lost as i32);

        // The dead agent's result for attempt 1 arrives late (simulated with its certificate).
        let leader = cluster.wait_leader(Duration::from_secs(5)).await;
        // Every node synced its log for the entries above, and says how long that took.
        for i in 0..3 {
            let syncs = cluster.metric(i, "drover_raft_log_sync_seconds_count");
            assert!(syncs.is_some_and(|n| n > 0.0), "node {i}: {syncs:?}");
        }
        let stale_before = cluster
            .metric(leader, "drover_stale_reports")
            .unwrap_or(0.0);
        let tls = drover_proto::tls::TlsFiles::in_dir(&cluster.tls_dir, "doomed")
            .load()
            .unwrap();
        let channel = drover_proto::client::connect(&cluster.addr(leader), &tls)
            .await
            .unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let held = vec![pb::RunningTask {
            task_id: task.id.clone(),
            attempt: 1,
        }];
        tx.send(pb::AgentMessage {
            msg: Some(In::Register(pb::Register {
                name: "doomed".into(),
                running: held,
                ..Default::default()
            })),
        })
        .await
        .unwrap();
        let mut inbound = pb::agent_service_client::AgentServiceClient::new(channel)
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let Some(pb::CoordinatorMessage {
            msg: Some(Out::Registered(reg)),
        }) = inbound.message().await.unwrap()
        else {
            panic!("expected registered");
        };
        assert_eq!(
            reg.stale.len(),
            1,
            "the coordinator tells the returning agent its attempt is stale"
        );
        tx.send(pb::AgentMessage {
            msg: Some(In::Finished(pb::TaskFinished {
                task_id: task.id.clone(),
                attempt: 1,
                outcome: Some(pb::TaskOutcome {
                    succeeded: true,
                    exit_code: Some(0),
                    stdout_tail: b"late\n".to_vec(),
                    ..Default::default()
                }),
                started_at_us: 0,
            })),
        })
        .await
        .unwrap();
        loop {
            match inbound.message().await.unwrap() {
                Some(pb::CoordinatorMessage {
                    msg: Some(Out::Ack(a)),
                }) if a.attempt == 1 => break,
                Some(_) => continue,
                None => panic!("session closed before the ack"),
            }
        }
        let after = droverctl::cli::get_run(&client, &id).await.unwrap();
        assert_eq!(after.tasks[0].attempt, 2);
        assert_eq!(
            String::from_utf8_lossy(&after.tasks[0].outcome.as_ref().unwrap().stdout_tail),
            "attempt 2\n"
        );
        let stale_after = cluster
            .metric(leader, "drover_stale_reports")
            .unwrap_or(0.0);
        assert!(
            stale_after >= stale_before + 1.0,
            "stale reports {stale_before} -> {stale_after}"
        );
        // Attempt 1 outlived its SIGKILLed agent (tasks have their own process group): stop it.
        let pid: i32 = std::fs::read_to_string(&orphan_pid_file).unwrap().trim().parse().unwrap();
        // SAFETY: kill(2) on a PID this test's task recorded; ESRCH if it already ended is fine.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_failover_with_busy_agents_loses_no_agent_and_runs_nothing_twice() {
    // Guards: the new leader grants full leases; running tasks keep their attempt across failover.
    tokio::time::timeout(TEST_DEADLINE, async {
        let mut cluster = Cluster::start(fast_leases()).await;
        cluster
            .add_agent("busy-1", &["--resources", "cpu=2,memory=1Gi"])
            .await;
        cluster
            .add_agent("busy-2", &["--resources", "cpu=2,memory=1Gi"])
            .await;
        let client = cluster.client();
        let mut ids = Vec::new();
        for i in 0..4 {
            let mut t = shell_task(&format!("sleep 2; echo task {i} attempt $DROVER_ATTEMPT"));
            t.resources = Some(pb::Resources {
                cpu_millis: 1000,
                ..Default::default()
            });
            ids.push(submit_task(&client, t).await);
        }
        wait_for(
            "all four tasks running",
            Duration::from_secs(20),
            || async {
                let mut running = 0;
                for id in &ids {
                    if task_of(&client, id).await?.state == pb::TaskState::Running as i32 {
                        running += 1;
                    }
                }
                (running == 4).then_some(())
            },
        )
        .await;
        let leader = cluster.wait_leader(Duration::from_secs(5)).await;
        cluster.kill(leader);
        for (i, id) in ids.iter().enumerate() {
            let run = wait_done(&client, id, Duration::from_secs(60)).await;
            assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:?}");
            assert_eq!(run.tasks[0].attempt, 1, "task {i} ran twice");
            assert_eq!(
                String::from_utf8_lossy(&run.tasks[0].outcome.as_ref().unwrap().stdout_tail),
                format!("task {i} attempt 1\n")
            );
        }
        // For a whole lease (2 s) past the failover nobody is declared lost: watched throughout,
        // failing at the first loss rather than after a blind sleep.
        let window = tokio::time::Instant::now() + Duration::from_millis(2_500);
        while tokio::time::Instant::now() < window {
            for name in ["busy-1", "busy-2"] {
                let a = cluster.agent(name).await.unwrap().agent.unwrap();
                assert_eq!(
                    a.state,
                    pb::AgentState::Active as i32,
                    "{name} was declared lost"
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let new_leader = cluster.wait_leader(Duration::from_secs(5)).await;
        assert_eq!(cluster.metric(new_leader, "drover_agents_lost"), Some(0.0));
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_lets_running_tasks_finish_places_nothing_new_and_enforces_its_deadline() {
    // Guards: drain / undrain, and a drain deadline stopping and re-queueing what still runs.
    tokio::time::timeout(TEST_DEADLINE, async {
        let mut cluster = Cluster::start(ClusterOptions::default()).await;
        cluster.add_agent("w1", &["--labels", "node=w1"]).await;
        cluster.add_agent("w2", &["--labels", "node=w2"]).await;
        let client = cluster.client();
        let mut on_w1 = shell_task("sleep 1.5; echo finished");
        on_w1.required = vec![expr("node = w1")];
        let first = submit_task(&client, on_w1).await;
        wait_for(
            "the task running on w1",
            Duration::from_secs(20),
            || async {
                task_of(&client, &first)
                    .await
                    .filter(|t| t.state == pb::TaskState::Running as i32)
            },
        )
        .await;
        let out = cluster
            .ctl()
            .args(["agent", "drain", "w1"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            cluster.agent("w1").await.unwrap().agent.unwrap().state,
            pb::AgentState::Draining as i32
        );
        // New work goes elsewhere while w1 drains.
        let mut ids = Vec::new();
        for _ in 0..3 {
            ids.push(submit_task(&client, shell_task("true")).await);
        }
        for id in &ids {
            assert_eq!(
                wait_done(&client, id, Duration::from_secs(30)).await.tasks[0].agent,
                "w2"
            );
        }
        // The running task finished normally, once.
        let run = wait_done(&client, &first, Duration::from_secs(30)).await;
        assert_eq!(
            (run.state, run.tasks[0].attempt),
            (pb::RunState::Succeeded as i32, 1)
        );

        // With a deadline: what still runs is stopped and re-queued as a new attempt.
        let out = cluster
            .ctl()
            .args(["agent", "undrain", "w1"])
            .output()
            .unwrap();
        assert!(out.status.success());
        let mut stubborn = shell_task(
            r#"if [ "$DROVER_ATTEMPT" = 1 ]; then sleep 60; fi; echo "attempt $DROVER_ATTEMPT""#,
        );
        stubborn.required = vec![expr("node = w1")];
        let id = submit_task(&client, stubborn).await;
        wait_for(
            "the stubborn task running",
            Duration::from_secs(20),
            || async {
                task_of(&client, &id)
                    .await
                    .filter(|t| t.state == pb::TaskState::Running as i32)
            },
        )
        .await;
        let out = cluster
            .ctl()
            .args(["agent", "drain", "w1", "--deadline", "1s"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let requeued = wait_for(
            "the re-queue at the deadline",
            Duration::from_secs(20),
            || async { task_of(&client, &id).await.filter(|t| t.attempt == 2) },
        )
        .await;
        assert_eq!(
            requeued.state,
            pb::TaskState::Pending as i32,
            "w1 is draining, so attempt 2 waits"
        );
        cluster
            .ctl()
            .args(["agent", "undrain", "w1"])
            .output()
            .unwrap();
        let run = wait_done(&client, &id, Duration::from_secs(30)).await;
        assert_eq!(
            (run.state, run.tasks[0].attempt),
            (pb::RunState::Succeeded as i32, 2)
        );
        assert_eq!(
            String::from_utf8_lossy(&run.tasks[0].outcome.as_ref().unwrap().stdout_tail),
            "attempt 2\n"
        );
        // Unknown agents are NOT_FOUND, in one line.
        let out = cluster
            .ctl()
            .args(["agent", "drain", "nobody"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("agent nobody not found"));
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_over_its_memory_limit_fails_with_oom_where_cgroups_v2_exist() {
    // Guards: per-task memory.max and the `oom` reason (needs writable cgroup v2 memory+cpu controllers).
    if let Err(why) = drover_agent::cgroup::detect(None) {
        // Written to the stderr handle, not eprintln!, so the test harness does not swallow it.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED a_task_over_its_memory_limit_fails_with_oom_where_cgroups_v2_exist: {why}"
        );
        assert!(!why.is_empty());
        return;
    }
    tokio::time::timeout(TEST_DEADLINE, async {
        let mut cluster = Cluster::start(ClusterOptions::default()).await;
        cluster.add_agent("limited", &[]).await;
        let client = cluster.client();
        let mut t = shell_task("head -c 400000000 /dev/zero | tail > /dev/null");
        t.resources = Some(pb::Resources {
            memory_bytes: 64 << 20,
            ..Default::default()
        });
        let id = submit_task(&client, t).await;
        let run = wait_done(&client, &id, Duration::from_secs(60)).await;
        let o = run.tasks[0].outcome.clone().unwrap();
        assert_eq!(run.state, pb::RunState::Failed as i32);
        assert_eq!(o.reason, "oom");
        assert!(o.peak_memory_bytes.is_some());
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_run_as_the_task_user_and_cannot_read_the_agents_key() {
    // Guards: a task running as the agent's user could read the agent's key and register as it
    // from anywhere; with --task-user it runs as another user that cannot.
    // SAFETY: geteuid(2) has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if uid != 0 {
        eprintln!(
            "skipped: --task-user needs the agent to run as root; this test runs as uid {uid}"
        );
        return;
    }
    tokio::time::timeout(TEST_DEADLINE, async {
        use std::os::unix::fs::PermissionsExt;
        let mut cluster = Cluster::start(ClusterOptions::default()).await;
        // The task user must reach its working directory inside the test's (0700) temp dir.
        std::fs::set_permissions(cluster.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let nobody = drover_agent::task_user::resolve("nobody").unwrap();
        cluster
            .add_agent("confined", &["--task-user", "nobody"])
            .await;
        let key = cluster.tls_dir.join("confined-key.pem");
        let client = cluster.client();
        let run = submit_task(
            &client,
            shell_task(&format!(
                "id -u; touch here && echo wrote; cat {}",
                key.display()
            )),
        )
        .await;
        let done = wait_done(&client, &run, Duration::from_secs(30)).await;
        let out = done.tasks[0].outcome.clone().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout_tail);
        let stderr = String::from_utf8_lossy(&out.stderr_tail);
        assert_eq!(stdout, format!("{}\nwrote\n", nobody.uid), "{stderr}");
        assert!(stderr.contains("Permission denied"), "{stderr}");
        assert!(!out.succeeded);

        // An agent whose key the task user could read refuses to start, naming the fix.
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let out = std::process::Command::new(drover_tests::bin("drover-agent"))
            .args(["--coordinator", &cluster.addr(0), "--tls-dir"])
            .arg(&cluster.tls_dir)
            .args(["--name", "confined", "--task-user", "nobody", "--work-dir"])
            .arg(cluster.path().join("w2"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(
            err.contains("readable by everyone") && err.contains("chmod 600"),
            "{err}"
        );
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assignment_never_started_is_sent_again_and_then_requeued() {
    // Guards: an assignment committed but never received (a failover between commit and send,
    // a commit confirmed after its proposer gave up, an unread session) used to stay assigned
    // until the agent's next registration: with a healthy session, for good.
    tokio::time::timeout(TEST_DEADLINE, async {
        use drover_proto::pb::coordinator_message::Msg as M;
        let cluster = Cluster::start(ClusterOptions {
            start_timeout_ms: 3_000,
            ..fast_leases()
        })
        .await;
        cluster.agent_cert("deaf");
        let leader = cluster.wait_leader(Duration::from_secs(10)).await;
        let register = pb::Register {
            name: "deaf".into(),
            resources: Some(pb::Resources {
                cpu_millis: 1_000,
                memory_bytes: 1 << 30,
                ..Default::default()
            }),
            ..Default::default()
        };
        let (mut deaf, _) = drover_tests::RawAgent::connect(
            &cluster.tls_dir,
            "deaf",
            &cluster.addr(leader),
            register,
        )
        .await
        .unwrap();
        let _beats = deaf.keep_alive(Duration::from_millis(200));
        let client = cluster.client();
        let run = submit_task(&client, shell_task("true")).await;
        let first = deaf.next_assign(Duration::from_secs(10)).await;
        assert_eq!(first.attempt, 1);
        // Ignored: the leader hands it over again (every 500 ms with a 3 s start timeout).
        let again = deaf.next_assign(Duration::from_secs(3)).await;
        assert_eq!(
            (again.task_id.as_str(), again.attempt),
            (first.task_id.as_str(), 1)
        );
        // Never started: re-queued as attempt 2 (here, on the same agent), attempt 1 cancelled.
        let mut cancelled = false;
        let second = loop {
            match deaf.next(Duration::from_secs(10)).await {
                Some(M::Cancel(c)) if c.attempt == 1 => cancelled = true,
                Some(M::Assign(a)) if a.attempt == 2 => break a,
                Some(_) => {}
                None => panic!("session ended"),
            }
        };
        assert!(cancelled, "attempt 1 is stopped on the agent");
        let task = task_of(&client, &run).await.unwrap();
        assert_eq!(task.attempt, 2);
        deaf.send(In::Started(pb::TaskStarted {
            task_id: second.task_id.clone(),
            attempt: 2,
            ..Default::default()
        }))
        .await;
        deaf.finish(&second.task_id, 2).await;
        let done = wait_done(&client, &run, Duration::from_secs(10)).await;
        assert_eq!(done.state, pb::RunState::Succeeded as i32);
        assert!(
            cluster
                .metric(leader, "drover_assignments_resent_total")
                .unwrap_or(0.0)
                >= 1.0
        );
        assert!(
            cluster
                .metric(leader, "drover_assignments_expired_total")
                .unwrap_or(0.0)
                >= 1.0
        );
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_its_quorum_ends_agent_sessions_and_refuses_new_ones() {
    // Guards: a leader that no quorum answers still believes it leads; its agents stayed with it,
    // while a leader elected elsewhere would declare them lost and re-queue their work.
    tokio::time::timeout(TEST_DEADLINE, async {
        let mut cluster = Cluster::start(fast_leases()).await;
        cluster.add_agent("loyal", &[]).await;
        let leader = cluster.wait_leader(Duration::from_secs(10)).await;
        let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
        wait_for(
            "the agent's session on the leader",
            Duration::from_secs(10),
            || async {
                (cluster.metric(leader, "drover_agent_sessions") == Some(1.0)).then_some(())
            },
        )
        .await;
        for &f in &followers {
            cluster.pause(f);
        }
        // Half a lease (1 s here) without a quorum: the sessions end.
        wait_for(
            "the cut-off leader to end its sessions",
            Duration::from_secs(10),
            || async {
                (cluster.metric(leader, "drover_agent_sessions") == Some(0.0)).then_some(())
            },
        )
        .await;
        cluster.agent_cert("newcomer");
        let e = drover_tests::RawAgent::connect(
            &cluster.tls_dir,
            "newcomer",
            &cluster.addr(leader),
            pb::Register {
                name: "newcomer".into(),
                ..Default::default()
            },
        )
        .await
        .err()
        .expect("refused");
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
        assert!(e.message().contains("heard from no quorum"), "{e}");
        for &f in &followers {
            cluster.resume(f);
        }
        // Back together, the agent finds whoever leads and runs work.
        cluster
            .wait_agent_connected("loyal", Duration::from_secs(20))
            .await;
        let run = submit_task(&cluster.client(), shell_task("echo back")).await;
        let done = wait_done(&cluster.client(), &run, Duration::from_secs(30)).await;
        assert_eq!(done.state, pb::RunState::Succeeded as i32);
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_as_it_commits_placements_strands_no_task() {
    // Guards: a leader killed between committing assignments and handing them to agents (or
    // with a plan whose commit it could not confirm) left tasks assigned that no agent knew of.
    // The next leader re-sends them (on registration, or in its sweep) and every task runs once.
    tokio::time::timeout(TEST_DEADLINE, async {
        let mut cluster = Cluster::start(ClusterOptions {
            start_timeout_ms: 6_000,
            ..fast_leases()
        })
        .await;
        cluster.add_agent("w1", &[]).await;
        cluster.add_agent("w2", &[]).await;
        let client = cluster.client();
        let mut runs = Vec::new();
        for round in 0..2 {
            let leader = cluster.wait_leader(Duration::from_secs(10)).await;
            // Submitted back to back, the last ones still being placed as the leader dies.
            for i in 0..12 {
                runs.push(
                    submit_task(
                        &client,
                        shell_task(&format!("echo r{round}-{i} attempt $DROVER_ATTEMPT")),
                    )
                    .await,
                );
            }
            cluster.kill(leader);
            cluster.restart(leader);
        }
        for id in &runs {
            let run = wait_done(&client, id, Duration::from_secs(60)).await;
            assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:?}");
            let out = String::from_utf8_lossy(&run.tasks[0].outcome.as_ref().unwrap().stdout_tail)
                .into_owned();
            assert!(out.ends_with(" attempt 1\n"), "{id} ran as {out:?}");
        }
    })
    .await
    .expect("test deadline");
}
