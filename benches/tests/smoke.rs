//! A few seconds of load through the real tools: proves they work and that under load no accepted
//! run is lost, fails or runs twice. It asserts correctness, never speed.

use std::sync::Arc;
use std::time::Duration;

use drover_benches::fleet::Fleet;
use drover_benches::load::{self, Kind, LoadOptions};
use drover_tests::{Cluster, ClusterOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_load_loses_nothing_and_runs_nothing_twice() {
    // Guards: drover-bench load's correctness checks, with noop and process tasks and a simulated fleet.
    tokio::time::timeout(Duration::from_secs(150), async {
        let mut cluster = Cluster::start(ClusterOptions::default()).await;
        cluster.add_agent("smoke-agent", &[]).await;
        let client = Arc::new(cluster.client());

        for (kind, runs) in [(Kind::Noop, 400), (Kind::Process(vec!["true".into()]), 60)] {
            let opts = LoadOptions {
                runs,
                concurrency: 16,
                rate: None,
                kind,
                finish_timeout: Duration::from_secs(60),
            };
            let report = load::run(client.clone(), &opts).await.unwrap();
            assert!(report.errors.is_empty(), "{report}");
            assert_eq!(report.submitted, runs, "{report}");
            assert!(report.is_clean(), "{report}");
        }

        // Simulated agents take work too, through real sessions.
        let fleet = Fleet::start(cluster.addrs(), &cluster.tls_dir, 20, "smoke-sim", 0)
            .await
            .unwrap();
        drover_tests::wait_for("20 simulated agents", Duration::from_secs(30), || async {
            (fleet
                .stats
                .registered
                .load(std::sync::atomic::Ordering::Relaxed)
                == 20)
                .then_some(())
        })
        .await;
        let opts = LoadOptions {
            runs: 300,
            concurrency: 16,
            rate: Some(500.0),
            kind: Kind::Noop,
            finish_timeout: Duration::from_secs(60),
        };
        let report = load::run(client.clone(), &opts).await.unwrap();
        assert!(report.is_clean(), "{report}");
        assert!(
            fleet
                .stats
                .assignments
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0,
            "the simulated agents got work"
        );
        fleet.stop().await;
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_survives_snapshots_and_a_follower_restart() {
    // Guards: drover-bench backlog's paths; large runs batch into entries within the Raft limits,
    // snapshots hold the queue, and a restarted follower restores all of it.
    tokio::time::timeout(Duration::from_secs(150), async {
        let p = drover_benches::backlog::in_process(5_000, 1_000).unwrap();
        assert_eq!(p.tasks, 5_000);
        assert!(p.snapshot_bytes > 0);

        let mut cluster = Cluster::start(ClusterOptions {
            snapshot_logs: 5,
            ..ClusterOptions::default()
        })
        .await;
        let client = Arc::new(cluster.client());
        let (accepted, errors) = drover_benches::backlog::fill(client, 20_000, 1_000, 4).await;
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(accepted, 20_000);
        let leader = cluster.wait_leader(Duration::from_secs(10)).await;
        let applied = |c: &Cluster, i: usize| c.metric(i, "drover_raft_applied_index");
        let target = applied(&cluster, leader).unwrap();
        assert!(
            cluster
                .metric(leader, "drover_snapshot_build_seconds_count")
                .unwrap()
                >= 1.0
        );
        let follower = (0..3).find(|&i| i != leader).unwrap();
        cluster.restart(follower);
        drover_tests::wait_for(
            "the restarted follower applied everything",
            Duration::from_secs(60),
            || async { (applied(&cluster, follower)? >= target).then_some(()) },
        )
        .await;
        assert_eq!(
            cluster.metric(follower, "drover_tasks{state=\"pending\"}"),
            Some(20_000.0)
        );
    })
    .await
    .expect("test deadline");
}
