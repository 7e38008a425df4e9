//! The example autoscaler hooks in deploy/hooks, run against fake `aws`, `gcloud` and `kubectl`
//! programs on PATH that record their arguments (the real clouds are out of reach here).

use std::path::{Path, PathBuf};
use std::process::Command;

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/hooks")
        .join(name)
}

/// A directory with fake CLIs: each appends its argv (one line) to `calls`, and fails with
/// `$FAKE_FAIL` on stderr when the argv contains `$FAKE_FAIL_ON`.
fn fakes() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for cli in ["aws", "gcloud", "kubectl"] {
        let path = dir.path().join(cli);
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\necho \"{cli} $*\" >> \"{}/calls\"\nif [ -n \"${{FAKE_FAIL_ON:-}}\" ]; then case \"$*\" in *\"$FAKE_FAIL_ON\"*) echo \"$FAKE_FAIL\" >&2; exit 1;; esac; fi\n",
                dir.path().display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
    }
    dir
}

fn run(name: &str, fake: &Path, env: &[(&str, &str)]) -> (bool, Vec<String>, String) {
    let path = format!(
        "{}:{}",
        fake.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("sh")
        .arg(script(name))
        .env("PATH", path)
        .env("DROVER_DECISION_ID", "12")
        .env("DROVER_POOL", "cpu-large")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let calls = std::fs::read_to_string(fake.join("calls")).unwrap_or_default();
    let _ = std::fs::remove_file(fake.join("calls"));
    (
        out.status.success(),
        calls.lines().map(str::to_owned).collect(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn aws_sets_desired_capacity_and_terminates_exactly_the_drained_instances() {
    let fake = fakes();
    let (ok, calls, _) = run("aws-asg.sh", fake.path(), &[("DROVER_DESIRED", "6")]);
    assert!(ok);
    assert_eq!(
        calls,
        [
            "aws autoscaling set-desired-capacity --auto-scaling-group-name cpu-large --desired-capacity 6"
        ]
    );
    let (ok, calls, _) = run(
        "aws-asg.sh",
        fake.path(),
        &[
            ("DROVER_DESIRED", "4"),
            ("DROVER_REMOVE_INSTANCES", "i-1 i-2"),
            ("DROVER_ASG_NAME", "workers"),
        ],
    );
    assert!(ok);
    assert_eq!(
        calls,
        [
            "aws autoscaling terminate-instance-in-auto-scaling-group --instance-id i-1 --should-decrement-desired-capacity",
            "aws autoscaling terminate-instance-in-auto-scaling-group --instance-id i-2 --should-decrement-desired-capacity",
        ]
    );
    // An instance already gone (a retried decision) is fine; another error is not.
    let gone = [
        ("DROVER_DESIRED", "4"),
        ("DROVER_REMOVE_INSTANCES", "i-1"),
        ("FAKE_FAIL_ON", "i-1"),
        (
            "FAKE_FAIL",
            "Instance Id not found - No managed instance found for instance ID i-1",
        ),
    ];
    assert!(run("aws-asg.sh", fake.path(), &gone).0);
    let denied = [
        ("DROVER_DESIRED", "4"),
        ("DROVER_REMOVE_INSTANCES", "i-1"),
        ("FAKE_FAIL_ON", "i-1"),
        ("FAKE_FAIL", "AccessDenied"),
    ];
    let (ok, _, stderr) = run("aws-asg.sh", fake.path(), &denied);
    assert!(!ok && stderr.contains("AccessDenied"), "{stderr}");
    // Without the decision it refuses to guess.
    assert!(!run("aws-asg.sh", fake.path(), &[]).0);
}

#[test]
fn gcp_resizes_or_deletes_exactly_the_drained_instances() {
    let fake = fakes();
    let (ok, calls, _) = run(
        "gcp-mig.sh",
        fake.path(),
        &[
            ("DROVER_DESIRED", "3"),
            ("DROVER_GCP_ZONE", "europe-west1-b"),
        ],
    );
    assert!(ok);
    assert_eq!(
        calls,
        [
            "gcloud compute instance-groups managed resize cpu-large --size=3 --zone=europe-west1-b --quiet"
        ]
    );
    let (ok, calls, _) = run(
        "gcp-mig.sh",
        fake.path(),
        &[
            ("DROVER_DESIRED", "1"),
            ("DROVER_GCP_REGION", "europe-west1"),
            ("DROVER_REMOVE_INSTANCES", "vm-a vm-b"),
        ],
    );
    assert!(ok);
    assert_eq!(
        calls,
        [
            "gcloud compute instance-groups managed delete-instances cpu-large --instances=vm-a,vm-b --region=europe-west1 --quiet"
        ]
    );
    let (ok, _, stderr) = run("gcp-mig.sh", fake.path(), &[("DROVER_DESIRED", "1")]);
    assert!(!ok && stderr.contains("DROVER_GCP_ZONE"), "{stderr}");
}

#[test]
fn kubernetes_marks_the_drained_pods_cheapest_to_delete_then_scales() {
    let fake = fakes();
    let (ok, calls, _) = run(
        "k8s.sh",
        fake.path(),
        &[
            ("DROVER_DESIRED", "2"),
            ("DROVER_REMOVE_INSTANCES", "agent-7c9f"),
            ("DROVER_K8S_NAMESPACE", "ci"),
        ],
    );
    assert!(ok);
    assert_eq!(
        calls,
        [
            "kubectl -n ci annotate pod agent-7c9f --overwrite controller.kubernetes.io/pod-deletion-cost=-1000",
            "kubectl -n ci scale deployment/cpu-large --replicas=2",
        ]
    );
}
