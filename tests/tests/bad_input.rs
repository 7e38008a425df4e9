//! Bad input gets a clear error and loses nothing: each case against a real cluster.

use std::time::Duration;

use drover_proto::client::{CallError, ClusterClient};
use drover_proto::pb;
use drover_proto::tls::TlsFiles;
use drover_tests::{Cluster, ClusterOptions, RawAgent, submit_cmd};
use tonic::Code;

const TEST_DEADLINE: Duration = Duration::from_secs(150);

fn one_task(name: &str, argv: &[&str]) -> pb::RunSpec {
    pb::RunSpec {
        name: "bad".into(),
        tasks: vec![pb::TaskSpec {
            name: name.into(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }],
        labels: Default::default(),
        strategy: String::new(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_gets_a_clear_error() {
    // Guards: the error contract of DESIGN.md #14 for each bad input named in the spine issue.
    tokio::time::timeout(TEST_DEADLINE, async {
        let cluster = Cluster::start(ClusterOptions::default()).await;
        let client = cluster.client();

        // Malformed YAML: droverctl names the file, line and column, in one line, exit 1.
        let bad = cluster.path().join("bad.yaml");
        std::fs::write(
            &bad,
            "name: broken\ntasks:\n  - name: a\n    shell: [unclosed\n",
        )
        .unwrap();
        let out = cluster
            .ctl()
            .args(["run", "submit", "-f"])
            .arg(&bad)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("bad.yaml") && err.contains("line 4") && err.contains("column"),
            "{err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");

        // Unknown run id: NOT_FOUND naming it, from the API and from droverctl.
        let e = droverctl::cli::get_run(&client, "run-424242")
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        assert!(e.to_string().contains("run-424242"), "{e}");
        let out = cluster
            .ctl()
            .args(["run", "get", "run-424242"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("run run-424242 not found"));

        // Invalid spec fields: INVALID_ARGUMENT with the field path.
        let e = droverctl::cli::submit(&client, one_task("Bad Name!", &["true"]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.to_string().contains("spec.tasks[0].name"), "{e}");
        let e = droverctl::cli::submit(&client, one_task("a", &[]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.to_string().contains("spec.tasks[0].command"), "{e}");

        // An agent certificate calling a client write: PERMISSION_DENIED naming the role.
        cluster.agent_cert("w1");
        let as_agent = cluster.client_as("w1", cluster.addrs());
        let e = droverctl::cli::submit(&as_agent, one_task("a", &["true"]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
        assert!(e.to_string().contains("role 'agent'"), "{e}");
        // A viewer may read but not write.
        let viewer = cluster.client_as("viewer", cluster.addrs());
        let e = droverctl::cli::submit(&viewer, one_task("a", &["true"]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);

        // A certificate from another CA: refused at the handshake; droverctl says so in one line.
        let other = cluster.path().join("other-ca");
        droverctl::certs::init(&other, 1, &[], false, droverctl::certs::VALID_FOR_DEFAULT).unwrap();
        let out = cluster
            .ctl()
            .env("DROVER_TLS_DIR", &other)
            .args(["--timeout", "2s", "run", "list"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(
            err.to_lowercase().contains("tls") || err.to_lowercase().contains("certificate"),
            "{err}"
        );

        // No client certificate at all: the server refuses the handshake.
        let ca = TlsFiles::in_dir(&cluster.tls_dir, "admin")
            .load()
            .unwrap()
            .ca_pem;
        let no_cert = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca));
        let channel =
            tonic::transport::Endpoint::from_shared(format!("https://{}", cluster.addr(0)))
                .unwrap()
                .tls_config(no_cert)
                .unwrap()
                .connect()
                .await;
        let refused = match channel {
            Err(_) => true,
            Ok(ch) => pb::client_service_client::ClientServiceClient::new(ch)
                .list_runs(pb::ListRunsRequest::default())
                .await
                .is_err(),
        };
        assert!(refused, "a client without a certificate must be refused");

        // A config file with a typo: the program refuses to start and names the key.
        let conf = cluster.path().join("bad-config.yaml");
        std::fs::write(&conf, "node-idd: 4\n").unwrap();
        let out = std::process::Command::new(drover_tests::bin("drover-coordinator"))
            .args(["--config", conf.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("unknown key 'node-idd'"), "{err}");

        // Nothing was lost along the way: a good submission still works and the bad ones left no run.
        let id = submit_cmd(&client, &["true"]).await;
        assert_eq!(id, "run-1");
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_without_a_quorum_are_unavailable_and_retried_until_one_returns() {
    // Guards: UNAVAILABLE during an election, and droverctl's retry with backoff up to its deadline.
    tokio::time::timeout(TEST_DEADLINE, async {
        let mut cluster = Cluster::start(ClusterOptions::default()).await;
        let leader = cluster.wait_leader(Duration::from_secs(10)).await;
        let survivor = (leader + 1) % 3;
        let third = (leader + 2) % 3;
        cluster.kill(leader);
        cluster.kill(third);

        // With one node of three nothing can commit: a short deadline ends in UNAVAILABLE.
        let mut impatient: ClusterClient = cluster.client_as("admin", vec![cluster.addr(survivor)]);
        impatient.retry_deadline = Duration::from_secs(2);
        let e = droverctl::cli::submit(&impatient, one_task("a", &["true"]))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, CallError::Status(s) if s.code() == Code::Unavailable)
                || e.code() == Code::Unavailable,
            "{e}"
        );

        // droverctl keeps retrying; bring a second node back and the same submission lands.
        let mut submit = cluster
            .ctl()
            .env("DROVER_ADDR", cluster.addrs().join(","))
            .args(["--timeout", "60s", "run", "submit", "--", "true"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            submit.try_wait().unwrap().is_none(),
            "droverctl should still be retrying"
        );
        cluster.restart(third);
        let out = tokio::task::spawn_blocking(move || submit.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(id.starts_with("run-"), "{id}");
        // Exactly one run was created for that submission, whatever the retries.
        let client = cluster.client();
        let runs = client
            .call(|mut c| async move { c.list_runs(pb::ListRunsRequest::default()).await })
            .await
            .unwrap();
        assert_eq!(
            runs.runs.len(),
            1,
            "{:?}",
            runs.runs.iter().map(|r| &r.id).collect::<Vec<_>>()
        );
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_stalled_mid_handshake_delay_nobody() {
    // Guards: the gRPC port runs TLS handshakes a step at a time under a few permits (the
    // coordinator's `accept`). A connection that never completes its handshake must hold none,
    // or a handful of them would shut every agent and client out until the handshake timeout.
    use tokio::io::AsyncWriteExt;
    tokio::time::timeout(TEST_DEADLINE, async {
        let cluster = Cluster::start(ClusterOptions::default()).await;
        let leader = cluster.wait_leader(Duration::from_secs(30)).await;
        let addr = cluster.addr(leader);
        const STALLED: usize = 64;
        let mut stalled = Vec::new();
        for i in 0..STALLED {
            let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
            if i % 2 == 1 {
                // A handshake record header promising 512 bytes that never come.
                s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
                    .await
                    .unwrap();
            }
            stalled.push(s);
        }
        drover_tests::wait_for(
            "the stalled handshakes in progress",
            Duration::from_secs(5),
            || async {
                (cluster.metric(leader, "drover_tls_handshakes_pending")? >= STALLED as f64)
                    .then_some(())
            },
        )
        .await;

        // A new client (a new connection, so a new handshake) is served at once.
        let started = std::time::Instant::now();
        let client = cluster.client_as("admin", vec![addr.clone()]);
        droverctl::cli::submit(&client, one_task("after-stalls", &["true"]))
            .await
            .expect("submit behind stalled handshakes");
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(5),
            "a new client waited {took:?} behind {STALLED} stalled handshakes"
        );

        // One address may hold only so many handshakes: past them, its connections are closed
        // at once (128 here with the 64 above).
        use tokio::io::AsyncReadExt;
        for _ in STALLED..128 {
            stalled.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
        }
        drover_tests::wait_for(
            "the per-address cap to fill",
            Duration::from_secs(5),
            || async {
                (cluster.metric(leader, "drover_tls_handshakes_pending")? >= 128.0).then_some(())
            },
        )
        .await;
        let mut extra = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf))
            .await
            .expect("closed at once, not left to time out");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        let refused = r#"drover_tls_handshakes_total{result="refused_per_ip"}"#;
        assert!(cluster.metric(leader, refused).unwrap_or(0.0) >= 1.0);

        // The stalled ones end at the handshake timeout (5 s), counted as such.
        let timeout = r#"drover_tls_handshakes_total{result="timeout"}"#;
        drover_tests::wait_for(
            "the stalled handshakes to time out",
            Duration::from_secs(30),
            || async { (cluster.metric(leader, timeout)? >= 128.0).then_some(()) },
        )
        .await;
        drop(stalled);
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_returning_smaller_than_it_holds_does_not_stop_the_cluster() {
    // Guards: apply once asserted `used <= total` after placing a task that asks for nothing on
    // an agent that had re-registered below what it held; every replica panicked on that entry,
    // and again on replaying it at restart: the cluster was down for good.
    tokio::time::timeout(TEST_DEADLINE, async {
        let cluster = Cluster::start(ClusterOptions::default()).await;
        let client = cluster.client();
        let leader = cluster.wait_leader(Duration::from_secs(10)).await;
        let resources = |cpu_millis| {
            Some(pb::Resources {
                cpu_millis,
                memory_bytes: 1 << 30,
                ..Default::default()
            })
        };
        let register = |cpu, running| pb::Register {
            name: "shrinking".into(),
            resources: resources(cpu),
            class: "default".into(),
            running,
            ..Default::default()
        };
        cluster.agent_cert("shrinking");
        let (mut first, _) = RawAgent::connect(
            &cluster.tls_dir,
            "shrinking",
            &cluster.addr(leader),
            register(2_000, vec![]),
        )
        .await
        .unwrap();
        let big = drover_tests::submit_task(
            &client,
            pb::TaskSpec {
                resources: resources(1_500),
                ..drover_tests::shell_task("true")
            },
        )
        .await;
        let assigned = first.next_assign(Duration::from_secs(10)).await;
        assert!(assigned.task_id.starts_with(&big));
        drop(first);

        // Back with half the capacity, still holding the task.
        let held = vec![pb::RunningTask {
            task_id: assigned.task_id.clone(),
            attempt: assigned.attempt,
        }];
        let (mut again, reg) = RawAgent::connect(
            &cluster.tls_dir,
            "shrinking",
            &cluster.addr(leader),
            register(1_000, held),
        )
        .await
        .unwrap();
        assert!(reg.stale.is_empty(), "{reg:?}");
        let zero = drover_tests::submit_task(
            &client,
            pb::TaskSpec {
                resources: Some(pb::Resources::default()),
                ..drover_tests::shell_task("true")
            },
        )
        .await;
        // The scheduler has looked at it and left it pending with a reason.
        let waiting = drover_tests::wait_for(
            "the zero task to be examined",
            Duration::from_secs(10),
            || async {
                let run = droverctl::cli::get_run(&client, &zero).await.ok()?;
                let t = &run.tasks[0];
                (t.state == pb::TaskState::Pending as i32
                    && !t.pending_reason.contains("waiting for the scheduler"))
                .then(|| t.pending_reason.clone())
            },
        )
        .await;
        eprintln!("zero task pending: {waiting}");
        // Every node still serves, at the same applied index or beyond.
        for i in 0..3 {
            assert!(
                cluster.status_of(i).await.is_some(),
                "node {i} stopped answering"
            );
        }
        // When the big task ends, the zero task is placed on the agent.
        again.finish(&assigned.task_id, assigned.attempt).await;
        let next = again.next_assign(Duration::from_secs(10)).await;
        assert!(next.task_id.starts_with(&zero), "{next:?}");
        let applied: Vec<u64> = {
            let mut v = Vec::new();
            for i in 0..3 {
                let s = drover_tests::wait_for("node status", Duration::from_secs(5), || {
                    cluster.status_of(i)
                })
                .await;
                v.push(s.applied_index);
            }
            v
        };
        assert!(applied.iter().all(|a| *a > 0), "{applied:?}");
        for i in 0..3 {
            // Seen to fail once, under a saturated host, with the detail lost: say what was read.
            let panics = cluster.metric(i, "drover_apply_panics_total");
            assert_eq!(
                panics,
                Some(0.0),
                "node {i}; its /metrics said: {:?}",
                cluster
                    .metrics_of(i)
                    .lines()
                    .filter(|l| l.contains("apply_panics") || l.starts_with("HTTP"))
                    .collect::<Vec<_>>()
            );
        }
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_certificate_registers_only_under_its_own_name() {
    // Guards: with one shared agent certificate, any holder could register as any agent, take its
    // assignments (environment and all), forge its results and requeue its work.
    tokio::time::timeout(TEST_DEADLINE, async {
        let mut cluster = Cluster::start(ClusterOptions::default()).await;
        cluster.add_agent("victim", &[]).await;
        cluster.agent_cert("intruder");
        let leader = cluster.wait_leader(Duration::from_secs(10)).await;
        let register = |name: &str| pb::Register {
            name: name.into(),
            ..Default::default()
        };
        let e = RawAgent::connect(
            &cluster.tls_dir,
            "intruder",
            &cluster.addr(leader),
            register("victim"),
        )
        .await
        .err()
        .expect("refused");
        assert_eq!(e.code(), Code::PermissionDenied, "{e}");
        assert!(
            e.message()
                .contains("certificate 'intruder' may register only as agent 'intruder'"),
            "{e}"
        );
        // The victim kept its session and still runs work.
        cluster
            .wait_agent_connected("victim", Duration::from_secs(5))
            .await;
        let run = submit_cmd(&cluster.client(), &["true"]).await;
        let done = drover_tests::wait_done(&cluster.client(), &run, Duration::from_secs(30)).await;
        assert_eq!(done.tasks[0].agent, "victim");
        // An admin certificate is no agent at all.
        let e = RawAgent::connect(
            &cluster.tls_dir,
            "admin",
            &cluster.addr(leader),
            register("admin"),
        )
        .await
        .err()
        .expect("refused");
        assert_eq!(e.code(), Code::PermissionDenied, "{e}");
        // An agent started under a name its certificate does not carry refuses to start, saying
        // which name the certificate has.
        let out = std::process::Command::new(drover_tests::bin("drover-agent"))
            .args(["--coordinator", &cluster.addr(leader), "--tls-dir"])
            .arg(&cluster.tls_dir)
            .args(["--name", "someone-else", "--tls-name", "intruder"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains("issued to agent 'intruder'"), "{err}");
    })
    .await
    .expect("test deadline");
}

fn sized_task(name: &str, queue: &str, arg_bytes: usize) -> pb::TaskSpec {
    pb::TaskSpec {
        name: name.into(),
        // Arguments are at most 64 KiB each.
        argv: std::iter::once("echo".to_owned())
            .chain(
                (0..arg_bytes.div_ceil(32 * 1024))
                    .map(|i| "x".repeat((arg_bytes - i * 32 * 1024).min(32 * 1024))),
            )
            .collect(),
        queue: queue.into(),
        ..Default::default()
    }
}

async fn submit_tasks(
    client: &ClusterClient,
    tasks: Vec<pb::TaskSpec>,
) -> Result<pb::SubmitRunResponse, CallError> {
    droverctl::cli::submit(
        client,
        pb::RunSpec {
            name: "budget".into(),
            tasks,
            ..Default::default()
        },
    )
    .await
}

fn limit_of(e: &CallError) -> String {
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    e.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submitters_and_queues_get_task_and_byte_budgets_that_name_themselves() {
    // Guards: counts alone let one submitter fill every replica's memory with large specs that
    // never place; now each submitter and each queue has a budget in tasks and in bytes.
    tokio::time::timeout(TEST_DEADLINE, async {
        let cluster = Cluster::start(ClusterOptions {
            coordinator_args: [
                "--submitter-pending-tasks-max=5",
                "--submitter-pending-bytes-max=64Ki",
                "--queue-pending-tasks-max=8",
                "--queue-pending-bytes-max=1Mi",
            ]
            .map(String::from)
            .to_vec(),
            ..ClusterOptions::default()
        })
        .await;
        // No agents: everything stays pending.
        let admin = cluster.client();
        let five = (0..5)
            .map(|i| sized_task(&format!("t{i}"), "", 10))
            .collect();
        submit_tasks(&admin, five).await.unwrap();
        let e = submit_tasks(&admin, vec![sized_task("one", "", 10)])
            .await
            .unwrap_err();
        let text = limit_of(&e);
        assert!(text.contains("submitter_pending_tasks_max"), "{text}");
        assert!(
            text.contains("submitter 'admin' has 5 tasks pending"),
            "{text}"
        );
        // Another submitter has a budget of its own, but the default queue is shared.
        let other = cluster.client_as("submitter", cluster.addrs());
        let three = (0..3)
            .map(|i| sized_task(&format!("t{i}"), "", 10))
            .collect();
        submit_tasks(&other, three).await.unwrap();
        let e = submit_tasks(&other, vec![sized_task("one", "", 10)])
            .await
            .unwrap_err();
        let text = limit_of(&e);
        assert!(text.contains("queue_pending_tasks_max"), "{text}");
        assert!(
            text.contains("queue 'default' has 8 tasks pending"),
            "{text}"
        );
        // Bytes: one large spec in another queue breaks the submitter's byte budget.
        let e = submit_tasks(&other, vec![sized_task("big", "etl", 100 * 1024)])
            .await
            .unwrap_err();
        let text = limit_of(&e);
        assert!(text.contains("submitter_pending_bytes_max"), "{text}");
        // A smaller one in that queue fits; a retry with the same key is answered, not refused.
        let spec = pb::RunSpec {
            name: "keyed".into(),
            tasks: vec![sized_task("small", "etl", 1024)],
            ..Default::default()
        };
        let submit = |key: &'static str| {
            let spec = spec.clone();
            let other = &other;
            async move {
                other
                    .call(|mut c| {
                        let spec = spec.clone();
                        async move {
                            c.submit_run(pb::SubmitRunRequest {
                                spec: Some(spec),
                                idempotency_key: key.into(),
                            })
                            .await
                        }
                    })
                    .await
            }
        };
        let first = submit("budget-key").await.unwrap();
        let again = submit("budget-key").await.unwrap();
        assert!(again.deduplicated && again.run_id == first.run_id);
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_never_placed_expire_with_their_reason_and_lost_agents_are_forgotten() {
    // Guards: a task no agent can take waited (and held memory) forever; so did the record of
    // every agent ever lost.
    tokio::time::timeout(TEST_DEADLINE, async {
        let mut cluster = Cluster::start(ClusterOptions {
            lease_ttl_ms: 2_000,
            heartbeat_interval_ms: 300,
            coordinator_args: ["--unplaced-timeout=2s", "--lost-agent-retention=1s"]
                .map(String::from)
                .to_vec(),
            ..ClusterOptions::default()
        })
        .await;
        cluster.add_agent("short-lived", &[]).await;
        let client = cluster.client();
        let run = drover_tests::submit_task(
            &client,
            pb::TaskSpec {
                class: "gpu-huge".into(),
                ..drover_tests::shell_task("true")
            },
        )
        .await;
        let done = drover_tests::wait_done(&client, &run, Duration::from_secs(20)).await;
        let task = &done.tasks[0];
        assert_eq!(task.state, pb::TaskState::Failed as i32);
        let reason = &task.outcome.as_ref().unwrap().reason;
        assert!(
            reason.starts_with("not placed within 2 s: no agent in class gpu-huge"),
            "{reason}"
        );
        // Lost, then forgotten a second later.
        cluster.kill_agent("short-lived");
        drover_tests::wait_for(
            "the agent to be forgotten",
            Duration::from_secs(20),
            || async {
                let list = client
                    .call(|mut c| async move { c.list_agents(pb::ListAgentsRequest {}).await })
                    .await
                    .ok()?;
                (!list.agents.iter().any(|a| a.name == "short-lived")).then_some(())
            },
        )
        .await;
        assert_eq!(
            drover_tests::get_agent(&client, "short-lived")
                .await
                .map(|_| ()),
            None
        );

        // Run lists come in pages, and say where the next starts.
        for _ in 0..2 {
            submit_cmd(&client, &["true"]).await;
        }
        let page = client
            .call(|mut c| async move {
                c.list_runs(pb::ListRunsRequest {
                    limit: 2,
                    before: String::new(),
                    ..Default::default()
                })
                .await
            })
            .await
            .unwrap();
        assert_eq!(page.runs.len(), 2);
        assert_eq!(page.next_before, page.runs[1].id);
        let out = cluster
            .ctl()
            .args(["run", "list", "--limit", "2"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!(
                "more: droverctl run list --before {}",
                page.next_before
            )),
            "{err}"
        );
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_state_machine_panics_stops_instead_of_serving_half_alive() {
    // Guards: a panic inside apply (on every replica at once: they apply the same entry) used to
    // leave each node's gRPC port up with its state machine dead. Test builds can poison one run
    // name (`DROVER_FAULT_PANIC_ON_RUN`); no real input can reach a panic any more.
    tokio::time::timeout(TEST_DEADLINE, async {
        let mut cluster = Cluster::start(ClusterOptions {
            coordinator_env: vec![("DROVER_FAULT_PANIC_ON_RUN".into(), "poison".into())],
            ..ClusterOptions::default()
        })
        .await;
        let client = cluster.client();
        submit_cmd(&client, &["true"]).await;
        let poison = pb::RunSpec {
            name: "poison".into(),
            tasks: vec![pb::TaskSpec {
                name: "t".into(),
                argv: vec!["true".into()],
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut quick = cluster.client();
        quick.retry_deadline = Duration::from_secs(2);
        let _ = droverctl::cli::submit(&quick, poison).await;
        // Every node that applies the entry stops, with a failure status and the reason in its
        // log: at least the quorum that committed it. (A third node the entry had not reached
        // when the others stopped never applies it, and waits for a leader.)
        let mut stopped: Vec<usize> = Vec::new();
        drover_tests::wait_for("a quorum of nodes to stop", Duration::from_secs(20), || {
            for i in 0..3 {
                if !stopped.contains(&i)
                    && let Some(status) = cluster.exited(i)
                {
                    assert!(!status.success(), "node {i}: {status:?}");
                    stopped.push(i);
                }
            }
            let enough = (stopped.len() >= 2).then_some(());
            async move { enough }
        })
        .await;
        for &i in &stopped {
            let log = cluster.log_of(i);
            assert!(
                log.contains("the coordinator stopped itself") && log.contains("panicked"),
                "node {i}: {}",
                log.lines().rev().take(5).collect::<Vec<_>>().join("\n")
            );
        }
    })
    .await
    .expect("test deadline");
}
