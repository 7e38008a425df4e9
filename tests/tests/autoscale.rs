//! Autoscaling agent pools on real coordinators (issue 24): the `local` hook grows a pool under
//! load and shrinks it when idle, a leader killed mid-scale-up launches nothing beyond the
//! committed decisions, a failing hook is retried, and a webhook's signature verifies.

use std::path::Path;
use std::time::Duration;

use drover_proto::pb;
use drover_tests::{Cluster, ClusterOptions, ctl_output, wait_done, wait_for};

const TEST_DEADLINE: Duration = Duration::from_secs(170);

fn options() -> ClusterOptions {
    ClusterOptions {
        lease_ttl_ms: 2_000,
        heartbeat_interval_ms: 300,
        coordinator_args: vec!["--autoscale-interval".into(), "300ms".into()],
        coordinator_env: vec![("HOOK_SECRET".into(), "s3cret".into())],
        ..Default::default()
    }
}

async fn apply(cluster: &Cluster, yaml: &str) {
    let file = cluster.path().join("pools.yaml");
    std::fs::write(&file, yaml).unwrap();
    let out = ctl_output(
        cluster.ctl().args(["pool", "apply", "-f"]).arg(&file),
        Duration::from_secs(30),
    )
    .await;
    assert!(out.status.success(), "{out:?}");
}

async fn pool(client: &drover_proto::client::ClusterClient, name: &str) -> Option<pb::PoolStatus> {
    client
        .call(|mut c| {
            let name = name.to_owned();
            async move { c.get_pool(pb::GetPoolRequest { name }).await }
        })
        .await
        .ok()
}

const LOCAL: &str = r#"pools:
  - name: burst
    min: 0
    max: 4
    scale_up:   {pending_per_agent: 2, step: 2, cooldown: 1s}
    scale_down: {idle_for: 2s, step: 4, cooldown: 1s}
    boot_timeout: 60s
    hook:
      local: {agent_args: ["--resources", "cpu=1,memory=1Gi"]}
"#;

fn burst_run(n: usize) -> pb::RunSpec {
    pb::RunSpec {
        name: "burst".into(),
        on_failure: "continue".into(),
        tasks: (0..n)
            .map(|i| pb::TaskSpec {
                name: format!("t{i}"),
                shell: "sleep 1".into(),
                class: "burst".into(),
                // One at a time per agent: the pool must grow to keep up.
                resources: Some(pb::Resources {
                    cpu_millis: 1000,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// Agents the local hooks of every node have started (one log file each).
fn launched(cluster: &Cluster) -> usize {
    (1..=3)
        .map(|id| {
            std::fs::read_dir(cluster.path().join(format!("data-{id}/local-agents")))
                .map(|d| {
                    d.flatten()
                        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
                        .count()
                })
                .unwrap_or(0)
        })
        .sum()
}

fn committed_launches(p: &pb::PoolStatus) -> u32 {
    p.decisions
        .iter()
        .filter(|d| d.to > d.from)
        .map(|d| d.to - d.from)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_pool_grows_under_load_never_past_max_and_shrinks_to_zero_when_idle() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let cluster = Cluster::start(options()).await;
        apply(&cluster, LOCAL).await;
        let client = cluster.client();
        let run = droverctl::cli::submit(&client, burst_run(40))
            .await
            .unwrap()
            .run_id;
        let mut most = 0;
        let done = loop {
            if let Some(p) = pool(&client, "burst").await {
                most = most.max(p.current + p.launching);
                assert!(p.current + p.launching <= 4, "past max: {p:?}");
            }
            let r = droverctl::cli::get_run(&client, &run).await.unwrap();
            if droverctl::output::is_terminal_run(r.state) {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        eprintln!("the pool reached {most} agents");
        assert_eq!(most, 4, "it grew to its max");
        assert_eq!(droverctl::output::run_state(done.state), "succeeded");
        assert!(
            done.tasks.iter().all(|t| t.attempt == 1),
            "no task lost or killed by the scaling"
        );
        // Idle for 2 s with nothing pending: back to zero.
        let p = wait_for(
            "the pool to shrink to 0",
            Duration::from_secs(40),
            || async {
                pool(&client, "burst")
                    .await
                    .filter(|p| p.current == 0 && p.launching == 0)
            },
        )
        .await;
        let last = p.decisions.last().unwrap();
        assert_eq!(last.to, 0, "{p:?}");
        assert!(last.reason.contains("idle"), "{}", last.reason);
        assert!(!last.remove.is_empty());
        assert!(launched(&cluster) as u32 <= committed_launches(&p));
        // What `pool get` shows.
        let out = ctl_output(
            cluster.ctl().args(["pool", "get", "burst"]),
            Duration::from_secs(30),
        )
        .await;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("Decisions") && text.contains("idle"),
            "{text}"
        );
        assert!(cluster.metrics_of(0).contains("drover_pool_agents"));
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_mid_scale_up_launches_nothing_beyond_the_committed_decisions() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let mut cluster = Cluster::start(options()).await;
        apply(&cluster, LOCAL).await;
        let client = cluster.client();
        let run = droverctl::cli::submit(&client, burst_run(30))
            .await
            .unwrap()
            .run_id;
        // The first decision commits; kill the leader while it launches.
        wait_for("a scale-up decision", Duration::from_secs(30), || async {
            pool(&client, "burst")
                .await
                .filter(|p| !p.decisions.is_empty())
        })
        .await;
        let leader = cluster.wait_leader(Duration::from_secs(30)).await;
        cluster.kill(leader);
        let done = wait_done(&client, &run, Duration::from_secs(120)).await;
        assert_eq!(droverctl::output::run_state(done.state), "succeeded");
        let p = pool(&client, "burst").await.unwrap();
        let (started, committed) = (launched(&cluster) as u32, committed_launches(&p));
        eprintln!("agents started {started}, launches committed {committed}");
        assert!(
            started <= committed,
            "started {started} > committed {committed}: {p:?}"
        );
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_hook_is_retried_and_a_webhook_is_signed() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let cluster = Cluster::start(options()).await;
        let client = cluster.client();
        // An exec hook that fails twice, then succeeds.
        let dir = cluster.path();
        let script = dir.join("hook.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nn=$(cat {d}/n 2>/dev/null || echo 0); n=$((n+1)); echo $n > {d}/n\ncat > {d}/input.$n\n[ $n -ge 3 ] || {{ echo cloud says no >&2; exit 1; }}\n",
                d = dir.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        // A webhook receiver that checks the signature.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (seen_tx, mut seen_rx) = tokio::sync::mpsc::channel::<(bool, String)>(8);
        let receiver = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            loop {
                let Ok((mut s, _)) = listener.accept().await else { return };
                let mut buf = vec![0u8; 65536];
                let mut n = 0;
                // Headers and the body (Content-Length), then answer.
                loop {
                    let k = s.read(&mut buf[n..]).await.unwrap_or(0);
                    if k == 0 { break; }
                    n += k;
                    let text = String::from_utf8_lossy(&buf[..n]).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len: usize = head.lines().find_map(|l| l.strip_prefix("Content-Length: ")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
                        if body.len() >= len {
                            let sig = head.lines().find_map(|l| l.strip_prefix("X-Drover-Signature: ")).unwrap_or("").to_owned();
                            let good = sig == drover_coordinator::webhook::signature("s3cret", body.as_bytes());
                            let _ = seen_tx.send((good, body.to_owned())).await;
                            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
                            break;
                        }
                    }
                }
            }
        });
        apply(
            &cluster,
            &format!(
                r#"pools:
  - name: flaky
    max: 3
    scale_up: {{pending_per_agent: 1, step: 1, cooldown: 60s}}
    scale_down: {{idle_for: 1h}}
    hook:
      exec: {{command: ["{script}"], timeout: 10s}}
  - name: hooked
    max: 2
    scale_up: {{pending_per_agent: 1, step: 2, cooldown: 60s}}
    scale_down: {{idle_for: 1h}}
    hook:
      webhook: {{url: "http://127.0.0.1:{port}/scale", secret_env: HOOK_SECRET, timeout: 5s}}
"#,
                script = script.display()
            ),
        )
        .await;
        for class in ["flaky", "hooked"] {
            droverctl::cli::submit(
                &client,
                pb::RunSpec {
                    name: class.into(),
                    tasks: (0..3)
                        .map(|i| pb::TaskSpec {
                            name: format!("t{i}"),
                            shell: "true".into(),
                            class: class.into(),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        }
        let (good, body) = tokio::time::timeout(Duration::from_secs(30), seen_rx.recv())
            .await
            .expect("a webhook call")
            .unwrap();
        assert!(good, "the signature verifies");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!((json["pool"].as_str(), json["desired"].as_u64()), (Some("hooked"), Some(2)));
        assert!(json["decision_id"].as_u64().is_some());
        let p = wait_for("the exec hook to succeed", Duration::from_secs(60), || async {
            pool(&client, "flaky")
                .await
                .filter(|p| p.decisions.first().is_some_and(|d| d.hook == "done"))
        })
        .await;
        let d = &p.decisions[0];
        assert_eq!(d.attempts, 3, "{d:?}");
        assert!(read(dir, "input.1").contains(&format!("\"decision_id\":{}", d.id)));
        assert_eq!(read(dir, "input.1"), read(dir, "input.3"), "the same decision each time");
        assert_eq!(p.hook_health, "ok");
        assert!(cluster.metrics_of(0).contains("autoscaler_hook_calls") || cluster.metrics_of(1).contains("autoscaler_hook_calls"));
        receiver.abort();
    })
    .await
    .expect("test deadline");
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_default()
}
