//! Hot paths of the coordinator, without any network: one scheduling round and applying batches.
//! Run: cargo bench -p drover-benches --bench core

use std::collections::BTreeMap;

use criterion::{Criterion, criterion_group, criterion_main};
use drover_coordinator::command::{Command, Request};
use drover_coordinator::model::{
    LabelExpr, LabelOp, Outcome, Program, Resources, RunSpec, Strategy, TaskSpec,
};
use drover_coordinator::raft::codec;
use drover_coordinator::scheduler::{self, AgentSlot, PendingTask, View};
use drover_coordinator::state::State;

fn eq(k: &str, v: &str) -> LabelExpr {
    LabelExpr {
        key: k.into(),
        op: LabelOp::Eq,
        values: vec![v.into()],
    }
}

/// Mixed classes, zones and disks; a third of the tasks require a zone, half prefer ssd, some spread.
fn view(tasks: usize, agents: usize) -> View<'static> {
    let classes = ["default", "cpu-large", "gpu"];
    let zones = ["a", "b", "c", "d"];
    View {
        pending: (0..tasks)
            .map(|i| PendingTask {
                id: format!("run-{}/t{i}", i / 10).into(),
                attempt: 1,
                run_id: format!("run-{}", i / 10).into(),
                class: classes[i % 3].into(),
                resources: std::borrow::Cow::Owned(Resources {
                    cpu_millis: 100 + (i as u64 % 7) * 50,
                    memory_bytes: (64 + (i as u64 % 5) * 64) << 20,
                    ..Default::default()
                }),
                required: if i % 3 == 0 {
                    vec![eq("zone", zones[i % 4])].into()
                } else {
                    vec![].into()
                },
                preferred: if i % 2 == 0 {
                    vec![(10, eq("disk", "ssd"))].into()
                } else {
                    vec![].into()
                },
                spread_by: if i % 5 == 0 { "zone".into() } else { "".into() },
                strategy: Strategy::BinPack,
                reason: "",
                queue: "default".into(),
            })
            .collect(),
        agents: (0..agents)
            .map(|i| AgentSlot {
                name: format!("agent-{i:05}"),
                class: classes[i % 3].into(),
                labels: BTreeMap::from([
                    ("zone".to_owned(), zones[i % 4].to_owned()),
                    (
                        "disk".to_owned(),
                        if i % 2 == 0 { "ssd" } else { "hdd" }.to_owned(),
                    ),
                ]),
                free: Resources {
                    cpu_millis: 16_000,
                    memory_bytes: 64 << 30,
                    ..Default::default()
                },
                slots: drover_coordinator::limits::AGENT_TASKS_MAX,
            })
            .collect(),
        placed: BTreeMap::new(),
        ..Default::default()
    }
}

fn submit_batch(n: usize, offset: usize) -> Request {
    Request {
        now_us: 1,
        commands: (0..n)
            .map(|i| Command::SubmitRun {
                idempotency_key: format!("key-{}", offset + i),
                spec: RunSpec {
                    name: "bench".into(),
                    tasks: vec![TaskSpec::new("main", Program::Argv(vec!["true".into()]))],
                    labels: BTreeMap::new(),
                    ..Default::default()
                },
                submitted_by: "bench".into(),
                placement: None,
            })
            .collect(),
    }
}

fn register(name: &str) -> Request {
    Request {
        now_us: 1,
        commands: vec![Command::RegisterAgent {
            name: name.into(),
            labels: BTreeMap::new(),
            total: Resources {
                cpu_millis: 1_000_000,
                memory_bytes: 1 << 40,
                ..Default::default()
            },
            class: "default".into(),
            version: String::new(),
            held: vec![],
            pool: String::new(),
            isolation: String::new(),
            instance_id: String::new(),
        }]
        .into(),
    }
}

/// Submits 1,000 one-task runs, assigns them all in one plan, finishes each.
fn lifecycle(s: &mut State, offset: usize) {
    s.apply(1, &submit_batch(1_000, offset));
    let ids: Vec<String> = (0..1_000)
        .map(|i| format!("run-{}/main", offset + i + 1))
        .collect();
    place_and_finish(s, &ids);
}

/// Places and finishes `steps` of run `run` on agent a.
fn run_steps(s: &mut State, run: &str, steps: &[String]) {
    let ids: Vec<String> = steps.iter().map(|n| format!("{run}/{n}")).collect();
    place_and_finish(s, &ids);
}

/// Assigns the tasks `ids` to agent a in one plan, then finishes them in one batch of results.
fn place_and_finish(s: &mut State, ids: &[String]) {
    s.apply(
        1,
        &Request {
            now_us: 2,
            commands: vec![Command::ApplyPlan {
                term: 1,
                assignments: ids
                    .iter()
                    .map(|t| drover_coordinator::model::Assignment {
                        task_id: t.clone(),
                        attempt: 1,
                        agent: "a".into(),
                    })
                    .collect(),
                unplaced: vec![],
            }]
            .into(),
        },
    );
    s.apply(
        1,
        &Request {
            now_us: 3,
            commands: ids
                .iter()
                .map(|t| Command::TaskFinished {
                    agent: "a".into(),
                    task_id: t.clone(),
                    attempt: 1,
                    outcome: Outcome {
                        succeeded: true,
                        exit_code: Some(0),
                        ..Default::default()
                    },
                    started_at_us: 0,
                })
                .collect(),
        },
    );
}

/// One run of 1,000 steps through apply: a fan-out/fan-in DAG (three waves: one step, 998 that
/// need it, one that needs them all), or (`flat`) the same steps in one wave.
fn thousand_steps(s: &mut State, run_seq: usize, flat: bool) {
    let middle: Vec<String> = (0..998).map(|i| format!("m{i}")).collect();
    let step = |name: &str, deps: &[String]| TaskSpec {
        depends_on: if flat { vec![] } else { deps.to_vec() },
        ..TaskSpec::new(name, Program::Argv(vec!["true".into()]))
    };
    let mut tasks = vec![step("out", &[])];
    tasks.extend(middle.iter().map(|m| step(m, &["out".to_owned()])));
    tasks.push(step("in", &middle));
    s.apply(
        1,
        &Request {
            now_us: 1,
            commands: vec![Command::SubmitRun {
                idempotency_key: String::new(),
                spec: RunSpec {
                    name: "dag".into(),
                    tasks,
                    ..Default::default()
                },
                submitted_by: "bench".into(),
                placement: None,
            }]
            .into(),
        },
    );
    let run = format!("run-{run_seq}");
    if flat {
        let mut all = vec!["out".to_owned()];
        all.extend(middle);
        all.push("in".into());
        run_steps(s, &run, &all);
    } else {
        run_steps(s, &run, &["out".to_owned()]);
        run_steps(s, &run, &middle);
        run_steps(s, &run, &["in".to_owned()]);
    }
}

fn benches(c: &mut Criterion) {
    // Issue 3's target: one round placing 10,000 tasks onto 1,000 agents in under 50 ms.
    let v = view(10_000, 1_000);
    c.bench_function("scheduler_plan_10000_tasks_1000_agents", |b| {
        b.iter(|| scheduler::plan(&v))
    });
    let small = view(1_000, 100);
    c.bench_function("scheduler_plan_1000_tasks_100_agents", |b| {
        b.iter(|| scheduler::plan(&small))
    });

    let batch = submit_batch(1_000, 0);
    c.bench_function("apply_submit_batch_1000_runs", |b| {
        b.iter_batched(
            State::default,
            |mut s| s.apply(1, &batch),
            criterion::BatchSize::SmallInput,
        )
    });

    // A task's whole life in apply: submitted, assigned by a plan, finished; 1,000 one-task runs
    // on one agent, over a state already holding 20,000 finished ones (what every replica does
    // per task on the no-op path).
    let mut warm = State::default();
    warm.apply(1, &register("a"));
    for k in 0..20 {
        lifecycle(&mut warm, k * 1_000);
    }
    c.bench_function("apply_lifecycle_1000_tasks", |b| {
        b.iter_batched(
            || warm.clone(),
            |mut s| lifecycle(&mut s, 20_000),
            criterion::BatchSize::LargeInput,
        )
    });

    // A 1,000-step DAG against the same steps without dependencies (issue 23): what releasing
    // dependents costs each replica.
    for (name, flat) in [
        ("apply_dag_fan_out_fan_in_1000_steps", false),
        ("apply_flat_run_1000_steps", true),
    ] {
        c.bench_function(name, |b| {
            b.iter_batched(
                || warm.clone(),
                |mut s| thousand_steps(&mut s, 20_001, flat),
                criterion::BatchSize::LargeInput,
            )
        });
    }

    let mut big = State::default();
    for k in 0..20 {
        big.apply(1, &submit_batch(1_000, k * 1_000));
    }
    c.bench_function("snapshot_encode_20000_runs", |b| {
        b.iter(|| serde_json::to_vec(&big).unwrap())
    });
    let bytes = serde_json::to_vec(&big).unwrap();
    c.bench_function("snapshot_decode_20000_runs", |b| {
        b.iter(|| serde_json::from_slice::<State>(&bytes).unwrap())
    });

    byte_fields(c);
}

/// A snapshot chunk's 3 MiB through the Raft codec, as the chunk has it (bytes) and as a plain
/// `Vec<u8>` field (one element at a time), in the same run; and a task outcome with full tails.
fn byte_fields(c: &mut Criterion) {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct AsBytes {
        #[serde(with = "codec::bytes")]
        data: Vec<u8>,
    }
    #[derive(serde::Serialize, serde::Deserialize)]
    struct AsVec {
        data: Vec<u8>,
    }
    let data: Vec<u8> = (0..3 << 20).map(|i: u32| (i * 31) as u8).collect();
    let as_bytes = AsBytes { data: data.clone() };
    let as_vec = AsVec { data };
    c.bench_function("codec_encode_3mib_as_bytes", |b| {
        b.iter(|| codec::encode(&as_bytes).unwrap())
    });
    c.bench_function("codec_encode_3mib_as_vec", |b| {
        b.iter(|| codec::encode(&as_vec).unwrap())
    });
    let encoded = codec::encode(&as_bytes).unwrap();
    c.bench_function("codec_decode_3mib_as_bytes", |b| {
        b.iter(|| codec::decode::<AsBytes>(&encoded).unwrap())
    });
    c.bench_function("codec_decode_3mib_as_vec", |b| {
        b.iter(|| codec::decode::<AsVec>(&encoded).unwrap())
    });
    let outcome = Outcome {
        exit_code: Some(0),
        reason: String::new(),
        duration_ms: 12,
        stdout_tail: vec![b'x'; 4096],
        stderr_tail: vec![b'y'; 4096],
        succeeded: true,
        ..Default::default()
    };
    c.bench_function("codec_round_trip_outcome_4kib_tails", |b| {
        b.iter(|| codec::decode::<Outcome>(&codec::encode(&outcome).unwrap()).unwrap())
    });
}

criterion_group! {
    name = core;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(3));
    targets = benches
}
criterion_main!(core);
