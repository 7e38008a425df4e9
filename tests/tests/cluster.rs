//! The spine end to end: real coordinators (Raft, sled, mTLS) and a real agent, as processes.

use std::time::Duration;

use drover_coordinator::raft::watchdog::{LeaderProber, Probe};
use drover_proto::pb;
use drover_tests::{Cluster, ClusterOptions, submit_cmd, wait_done, wait_for};

const TEST_DEADLINE: Duration = Duration::from_secs(150);

fn stdout_of(run: &pb::Run) -> String {
    String::from_utf8_lossy(&run.tasks[0].outcome.as_ref().expect("outcome").stdout_tail)
        .into_owned()
}

/// A process's `THP_enabled` line from its status (Linux 5.0 and later report it).
fn thp_line(pid: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("THP_enabled:"))
        .map(|l| format!("{l}\n"))
}

/// Waits until the run's first task is running on an agent.
async fn wait_running(client: &drover_proto::client::ClusterClient, run_id: &str) {
    wait_for(
        "the task to be running",
        Duration::from_secs(20),
        || async {
            let run = droverctl::cli::get_run(client, run_id).await.ok()?;
            (run.tasks[0].state == pb::TaskState::Running as i32).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_hello_runs_to_success_with_its_output() {
    // Guards: submit -> schedule -> agent runs a process -> result replicated, on 3 nodes + 1 agent.
    tokio::time::timeout(TEST_DEADLINE, async {
        let mut cluster = Cluster::start(ClusterOptions::default()).await;
        // Settings from a config file (keys are DROVER_* names without the prefix); flags win.
        let config = cluster.path().join("agent.yaml");
        std::fs::write(
            &config,
            "labels: [zone=a, disk=ssd]\npool: blue\nagent-name: ignored\n",
        )
        .unwrap();
        cluster
            .add_agent("worker-1", &["--config", config.to_str().unwrap()])
            .await;
        let client = cluster.client();
        let agent = cluster.agent("worker-1").await.unwrap().agent.unwrap();
        assert_eq!(agent.labels.get("disk").map(String::as_str), Some("ssd"));
        assert_eq!(agent.pool, "blue");
        let run_id = submit_cmd(&client, &["echo", "hello"]).await;
        let run = wait_done(&client, &run_id, Duration::from_secs(30)).await;
        assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:?}");
        assert_eq!(stdout_of(&run), "hello\n");
        assert_eq!(run.tasks[0].agent, "worker-1");
        let outcome = run.tasks[0].outcome.as_ref().unwrap();
        assert_eq!(outcome.exit_code, Some(0));

        // The coordinators turn transparent huge pages off for themselves; a task keeps the
        // setting the agent was started with (the flag passes to children).
        match thp_line("self") {
            None => eprintln!("huge-page check skipped: this kernel reports no THP_enabled"),
            Some(own) => {
                let pid = cluster.coordinator_pid(0).unwrap().to_string();
                assert_eq!(thp_line(&pid).as_deref(), Some("THP_enabled:\t0\n"));
                let run_id =
                    submit_cmd(&client, &["grep", "THP_enabled", "/proc/self/status"]).await;
                let run = wait_done(&client, &run_id, Duration::from_secs(30)).await;
                assert_eq!(stdout_of(&run), own);
            }
        }

        // The full log comes from the agent's disk through the leader.
        let out = cluster
            .ctl()
            .args(["run", "logs", &run_id])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");

        // A failing command is failed, with its exit code, stderr and a non-zero droverctl exit.
        let out = cluster
            .ctl()
            .args([
                "run",
                "submit",
                "--wait",
                "--",
                "sh",
                "-c",
                "echo oops >&2; exit 3",
            ])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let table = String::from_utf8_lossy(&out.stdout);
        assert!(
            table.contains("failed") && table.contains("exit 3") && table.contains("oops"),
            "{table}"
        );
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_cluster_forms_without_its_first_member_which_joins_later() {
    // Guards: only the lowest id initialises a new cluster at once; the others do it themselves
    // after a grace period, so a cluster whose first member is down still forms, and that member
    // joins as a follower of the leader already elected.
    tokio::time::timeout(TEST_DEADLINE, async {
        let mut cluster = Cluster::start(ClusterOptions {
            absent: Some(0),
            ..Default::default()
        })
        .await;
        let leader = cluster.wait_leader(Duration::from_secs(30)).await;
        assert_ne!(leader, 0);
        let client = cluster.client_as("admin", vec![cluster.addr(1), cluster.addr(2)]);
        cluster.add_agent("worker-1", &[]).await;
        let run = submit_cmd(&client, &["echo", "formed"]).await;
        wait_done(&client, &run, Duration::from_secs(30)).await;

        cluster.restart(0);
        let term = cluster.status_of(leader).await.unwrap().term;
        let joined = wait_for(
            "the first member to follow",
            Duration::from_secs(30),
            || async {
                cluster
                    .status_of(0)
                    .await
                    .filter(|s| s.state == "follower" && s.term == term)
            },
        )
        .await;
        assert_eq!(
            joined.term, term,
            "the late member did not disturb the leader"
        );
        assert_eq!(cluster.wait_leader(Duration::from_secs(5)).await, leader);
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_elects_a_new_one_and_keeps_every_run() {
    // Guards: leader SIGKILL -> new leader, committed runs survive, new submissions still complete.
    tokio::time::timeout(TEST_DEADLINE, async {
        let mut cluster = Cluster::start(ClusterOptions::default()).await;
        cluster.add_agent("worker-1", &[]).await;
        let client = cluster.client();
        let before = submit_cmd(&client, &["echo", "before"]).await;
        wait_done(&client, &before, Duration::from_secs(30)).await;

        let old_leader = cluster.wait_leader(Duration::from_secs(10)).await;
        let old_term = cluster.status_of(old_leader).await.unwrap().term;
        cluster.kill(old_leader);
        let new_leader = cluster.wait_leader(Duration::from_secs(30)).await;
        assert_ne!(new_leader, old_leader);
        assert!(cluster.status_of(new_leader).await.unwrap().term > old_term);

        let run = wait_done(&client, &before, Duration::from_secs(10)).await;
        assert_eq!(run.state, pb::RunState::Succeeded as i32);
        assert_eq!(stdout_of(&run), "before\n");

        // The agent follows the new leader and runs new work.
        let after = submit_cmd(&client, &["echo", "after"]).await;
        let run = wait_done(&client, &after, Duration::from_secs(60)).await;
        assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:?}");
        assert_eq!(stdout_of(&run), "after\n");
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_cluster_restart_recovers_every_run_and_result() {
    // Guards: state is rebuilt from sled (log + snapshot) after all nodes die at once.
    tokio::time::timeout(TEST_DEADLINE, async {
        let opts = ClusterOptions {
            snapshot_logs: 20,
            ..Default::default()
        };
        let mut cluster = Cluster::start(opts).await;
        cluster.add_agent("worker-1", &[]).await;
        let client = cluster.client();
        let mut ids = Vec::new();
        for i in 0..15 {
            let id = submit_cmd(&client, &["echo", &format!("run {i}")]).await;
            ids.push(id);
        }
        for id in &ids {
            wait_done(&client, id, Duration::from_secs(60)).await;
        }
        for i in 0..3 {
            cluster.kill(i);
        }
        for i in 0..3 {
            cluster.restart(i);
        }
        cluster.wait_leader(Duration::from_secs(30)).await;
        let client = cluster.client();
        for (i, id) in ids.iter().enumerate() {
            let run = wait_done(&client, id, Duration::from_secs(10)).await;
            assert_eq!(run.state, pb::RunState::Succeeded as i32);
            assert_eq!(stdout_of(&run), format!("run {i}\n"));
        }
        // Ids keep counting from where they were: no re-initialisation happened.
        let next = submit_cmd(&client, &["true"]).await;
        assert_eq!(next, format!("run-{}", ids.len() + 1));
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_missed_500_runs_catches_up_and_serves_them() {
    // Guards: log compaction + snapshot install bring a returning follower up to date.
    tokio::time::timeout(TEST_DEADLINE, async {
        // Batching packs 500 submissions into ~70 entries; a low threshold makes the leader compact
        // its log well past the point where the follower stopped, so catching up needs a snapshot.
        let opts = ClusterOptions {
            snapshot_logs: 10,
            ..Default::default()
        };
        let mut cluster = Cluster::start(opts).await;
        let leader = cluster.wait_leader(Duration::from_secs(10)).await;
        let follower = (leader + 1) % 3;
        let follower_had = wait_for("the follower's status", Duration::from_secs(10), || async {
            Some(cluster.status_of(follower).await?.last_log_index)
        })
        .await;
        cluster.kill(follower);
        let client = std::sync::Arc::new(cluster.client());
        let mut submitted = Vec::new();
        for chunk in 0..10 {
            let mut batch = tokio::task::JoinSet::new();
            for i in 0..50 {
                let client = client.clone();
                batch.spawn(async move {
                    submit_cmd(&client, &["echo", &format!("{chunk}-{i}")]).await
                });
            }
            submitted.extend(batch.join_all().await);
        }
        assert_eq!(submitted.len(), 500);
        // openraft keeps entries a replication to the stopped follower still has in flight, so
        // wait until the leader has compacted away what the follower lacks: only a snapshot
        // can bring it back then.
        wait_for(
            "the leader to compact its log past the stopped follower",
            Duration::from_secs(60),
            || async {
                (cluster.metric(leader, "drover_raft_purged_index")? > follower_had as f64)
                    .then_some(())
            },
        )
        .await;
        cluster.restart(follower);
        let reader = cluster.client_as("viewer", vec![cluster.addr(follower)]);
        let runs = wait_for(
            "the follower to serve all 500 runs",
            Duration::from_secs(60),
            || async {
                let resp = reader
                    .call(|mut c| async move {
                        c.list_runs(pb::ListRunsRequest {
                            limit: 1000,
                            before: String::new(),
                            ..Default::default()
                        })
                        .await
                    })
                    .await
                    .ok()?;
                (resp.runs.len() == 500).then_some(resp.runs)
            },
        )
        .await;
        let mut ids: Vec<String> = runs.into_iter().map(|r| r.id).collect();
        ids.sort();
        submitted.sort();
        assert_eq!(ids, submitted);
        let status = cluster.status_of(follower).await.unwrap();
        assert!(
            status.snapshot_index.is_some(),
            "the follower should hold a snapshot: {status:?}"
        );
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_running_across_a_leader_failover_keeps_its_attempt_and_result() {
    // Guards: the agent reconnects to the new leader, keeps its running task and delivers the result.
    tokio::time::timeout(TEST_DEADLINE, async {
        let mut cluster = Cluster::start(ClusterOptions::default()).await;
        cluster.add_agent("worker-1", &[]).await;
        let client = cluster.client();
        let run_id = submit_cmd(&client, &["sh", "-c", "sleep 2; echo survived"]).await;
        wait_running(&client, &run_id).await;
        let leader = cluster.wait_leader(Duration::from_secs(10)).await;
        cluster.kill(leader);
        let run = wait_done(&client, &run_id, Duration::from_secs(60)).await;
        assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:?}");
        assert_eq!(
            run.tasks[0].attempt, 1,
            "the task must not have been re-run"
        );
        assert_eq!(stdout_of(&run), "survived\n");
        let agents = client
            .call(|mut c| async move { c.list_agents(pb::ListAgentsRequest {}).await })
            .await
            .unwrap();
        assert_eq!(
            agents.agents[0].state,
            pb::AgentState::Active as i32,
            "no agent may be declared lost"
        );
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_that_could_not_commit_is_proposed_again_once_a_quorum_answers() {
    // Guards: with both followers frozen the leader cannot commit the agent's result; it holds
    // the write for its lease, then proposes the report again while the session lasts, so the
    // result lands once the followers are back, without the agent registering again.
    tokio::time::timeout(TEST_DEADLINE, async {
        let mut cluster = Cluster::start(ClusterOptions::default()).await;
        cluster.add_agent("worker-1", &[]).await;
        let client = cluster.client();
        let run_id = submit_cmd(&client, &["sh", "-c", "sleep 1; echo late"]).await;
        wait_running(&client, &run_id).await;
        let leader = cluster.wait_leader(Duration::from_secs(10)).await;
        let followers: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
        for &f in &followers {
            cluster.pause(f);
        }
        // Frozen long enough for the task to end and its report to be refused past the
        // proposer's hold (`LEASE_WAIT`, 3 s): without proposing it again, the run never ends.
        wait_for(
            "the leader to hold a write for its lease",
            Duration::from_secs(20),
            || async {
                (cluster.metric(leader, "drover_raft_proposals_held_for_lease_total")? > 0.0)
                    .then_some(())
            },
        )
        .await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        for &f in &followers {
            cluster.resume(f);
        }
        let run = wait_done(&client, &run_id, Duration::from_secs(60)).await;
        assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:?}");
        assert_eq!(
            run.tasks[0].attempt, 1,
            "the task must not have been re-run"
        );
        assert_eq!(stdout_of(&run), "late\n");
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_answers_a_probe_as_leader_and_only_to_coordinators() {
    // Guards: a follower's election watchdog holds off only for a node that leads in its term,
    // and no certificate but a coordinator's can ask (an answer holds off elections).
    use drover_proto::pb::raft_service_client::RaftServiceClient;
    use drover_proto::tls::TlsFiles;
    tokio::time::timeout(TEST_DEADLINE, async {
        let cluster = Cluster::start(ClusterOptions::default()).await;
        let leader = cluster.wait_leader(Duration::from_secs(10)).await;
        let term = cluster.status_of(leader).await.unwrap().term;
        let probe = |cert: &'static str, i: usize| {
            let tls = TlsFiles::in_dir(&cluster.tls_dir, cert).load().unwrap();
            let addr = cluster.addr(i);
            async move {
                let channel = drover_proto::client::connect(&addr, &tls).await.unwrap();
                RaftServiceClient::new(channel)
                    .leader_probe(pb::LeaderProbeRequest {})
                    .await
                    .map(tonic::Response::into_inner)
            }
        };
        for i in 0..3 {
            let reply = probe("coordinator-1", i)
                .await
                .expect("a coordinator may probe");
            assert_eq!(reply.leading, i == leader, "node {i}");
            assert_eq!(reply.term, term, "node {i}");
        }
        cluster.agent_cert("probe-agent");
        for cert in ["admin", "probe-agent"] {
            let e = probe(cert, leader).await.expect_err("only coordinators");
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{cert}");
        }
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followers_probe_reaches_the_leader_over_a_warmed_connection_and_reconnects_after_a_kill()
{
    // Guards: the watchdog's leader probe (what holds a follower off a live but silent leader)
    // opens its connection in the background, answers by the leader's term, counts a killed
    // leader as unreachable, and after a failed call connects afresh instead of reusing the
    // dead connection.
    tokio::time::timeout(TEST_DEADLINE, async {
        let mut cluster = Cluster::start(ClusterOptions::default()).await;
        let leader = cluster.wait_leader(Duration::from_secs(10)).await;
        let term = cluster.metric(leader, "drover_raft_term").expect("term") as u64;
        let peers: Vec<(u64, String)> = cluster
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.id, cluster.addr(i)))
            .collect();
        let id = cluster.nodes[leader].id;
        let tls = drover_proto::tls::TlsFiles::in_dir(&cluster.tls_dir, "coordinator-1")
            .load()
            .unwrap();
        // Behind a lock only so `wait_for`'s closures can share it.
        let prober = tokio::sync::Mutex::new(LeaderProber::new(std::sync::Arc::new(peers), tls));

        prober.lock().await.warm(id).await;
        wait_for("the background connection", Duration::from_secs(10), || {
            let prober = &prober;
            async move { prober.lock().await.connected_to(id).await.then_some(()) }
        })
        .await;
        let mut p = prober.lock().await;
        assert_eq!(p.probe(id, term).await, Probe::Leading);
        assert_eq!(p.probe(id, term + 1).await, Probe::NotLeading);

        cluster.kill(leader);
        assert_eq!(p.probe(id, term).await, Probe::Unreachable);
        assert!(
            !p.connected_to(id).await,
            "a failed call drops the connection"
        );
        drop(p);

        // Back, it answers on a new connection: leading again in the same term when it restarted
        // before the followers campaigned (its vote is on disk), or not leading in it.
        cluster.restart(leader);
        wait_for(
            "an answer from the restarted node",
            Duration::from_secs(20),
            || {
                let prober = &prober;
                async move {
                    (prober.lock().await.probe(id, term).await != Probe::Unreachable).then_some(())
                }
            },
        )
        .await;
        assert!(prober.lock().await.connected_to(id).await);
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_cluster_keeps_its_agents() {
    // Guards: a single voter is its own quorum; the check that ends agent sessions on a leader
    // cut off from its quorum must not take its silence for a partition.
    tokio::time::timeout(TEST_DEADLINE, async {
        let mut cluster = Cluster::start(ClusterOptions {
            nodes: 1,
            ..Default::default()
        })
        .await;
        cluster.add_agent("solo", &[]).await;
        // Longer than half a lease (2 s): watched throughout, failing at the first end.
        let window = tokio::time::Instant::now() + Duration::from_millis(3_000);
        while tokio::time::Instant::now() < window {
            assert_eq!(cluster.metric(0, "drover_agent_sessions"), Some(1.0));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let run = drover_tests::submit_cmd(&cluster.client(), &["true"]).await;
        let done = drover_tests::wait_done(&cluster.client(), &run, Duration::from_secs(20)).await;
        assert_eq!(done.state, pb::RunState::Succeeded as i32);
    })
    .await
    .expect("test deadline");
}
