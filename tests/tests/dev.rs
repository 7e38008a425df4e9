//! The quickstart's first command: `droverctl dev` brings up 3 coordinators and 2 agents with mTLS
//! and completes the demo run.

use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn droverctl_dev_runs_the_demo_to_success_and_stops_everything() {
    // Guards: the README's run command works on a fresh directory.
    let dir = tempfile::tempdir().unwrap();
    // Six consecutive ports (3 gRPC at BASE.., 3 HTTP at BASE+100..): pick a base whose ports are free.
    let base = (0..50)
        .map(|i| 20_000 + ((std::process::id() as u16 % 200) * 100 + i * 7) % 30_000)
        .find(|b| {
            (0..3).all(|i| {
                std::net::TcpListener::bind(("127.0.0.1", b + i)).is_ok()
                    && std::net::TcpListener::bind(("127.0.0.1", b + 100 + i)).is_ok()
            })
        })
        .expect("a free port range");
    let mut child = Command::new(drover_tests::bin("droverctl"))
        .args([
            "dev",
            "--exit-after-demo",
            "--base-port",
            &base.to_string(),
            "--dir",
        ])
        .arg(dir.path().join("dev"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Its agents run in its own process, and their tasks inherit its huge-page setting: it must
    // leave the one it was started with (the coordinator's program turns it off for itself).
    let thp = |pid: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()?
            .lines()
            .find(|l| l.starts_with("THP_enabled:"))
            .map(str::to_owned)
    };
    let own_thp = thp("self");
    let mut dev_thp = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        // The last reading while it runs (an exited process reports none).
        if let Some(t) = thp(&child.id().to_string()) {
            dev_thp = Some(t);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("droverctl dev did not finish the demo within 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stdout.contains("succeeded") && stdout.contains("hello from drover"),
        "{stdout}"
    );
    assert!(stderr.contains("export DROVER_ADDR="), "{stderr}");
    match own_thp {
        None => eprintln!("huge-page check skipped: this kernel reports no THP_enabled"),
        Some(own) => assert_eq!(dev_thp, Some(own)),
    }
    // Everything it started is gone: its ports are free again.
    assert!(std::net::TcpListener::bind(("127.0.0.1", base)).is_ok());
}
