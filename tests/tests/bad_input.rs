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

        // The stalled ones end at the handshake timeout (10 s), counted as such.
        let timeout = r#"drover_tls_handshakes_total{result="timeout"}"#;
        drover_tests::wait_for(
            "the stalled handshakes to time out",
            Duration::from_secs(30),
            || async { (cluster.metric(leader, timeout)? >= STALLED as f64).then_some(()) },
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
            assert_eq!(
                cluster.metric(i, "drover_apply_panics_total"),
                Some(0.0),
                "node {i}"
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
