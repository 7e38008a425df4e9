//! `drover-bench fleet`: many lightweight simulated agents from one process. Each holds a real
//! gRPC session with the leader (over its own mTLS connection, as a real agent), heartbeats
//! at the interval the leader asks for, and completes every assignment itself (a noop executor,
//! optionally after a delay). Scheduling and liveness are measured at fleet scale this way.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use std::time::Duration;
use tokio::sync::{Notify, Semaphore};

use drover_proto::client::{connect, leader_hint};
use drover_proto::pb::agent_message::Msg as In;
use drover_proto::pb::coordinator_message::Msg as Out;
use drover_proto::pb::{self, agent_service_client::AgentServiceClient};
use drover_proto::tls::TlsMaterial;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Simulated agents connecting (TCP, TLS, registration) at once. Real agents each have their
/// own CPU for their handshake; here they share the simulator's, and with all 10,000 connecting
/// together the handshakes starved the registered agents' heartbeat timers for longer than a
/// lease (agents were declared lost, falsely, by the simulator's fault).
const CONNECTS_IN_FLIGHT: usize = 64;

#[derive(Default)]
pub struct FleetStats {
    pub registered: AtomicU64,
    pub assignments: AtomicU64,
    pub reconnects: AtomicU64,
}

/// Tells one simulated agent to stop; it notices at once, without polling.
#[derive(Default)]
struct Stop {
    flag: AtomicBool,
    wake: Notify,
}

impl Stop {
    fn set(&self) {
        self.flag.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }

    fn is_set(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }
}

pub struct Fleet {
    pub stats: Arc<FleetStats>,
    stops: Vec<Arc<Stop>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Fleet {
    /// Starts `n` simulated agents named `PREFIX-N`, each with a certificate of its own (an
    /// agent registers only under its certificate's name), signed in memory by the CA in
    /// `tls_dir` (which must hold its key).
    pub async fn start(
        addrs: Vec<String>,
        tls_dir: &std::path::Path,
        n: usize,
        prefix: &str,
        noop_ms: u64,
    ) -> Result<Fleet, droverctl::certs::CertError> {
        let ca = droverctl::certs::Authority::open(tls_dir)?;
        let ca_pem = std::fs::read(tls_dir.join("ca.pem")).map_err(|source| {
            droverctl::certs::CertError::Io {
                path: tls_dir.join("ca.pem").display().to_string(),
                source,
            }
        })?;
        let stats = Arc::new(FleetStats::default());
        let addrs = Arc::new(addrs);
        let connecting = Arc::new(Semaphore::new(CONNECTS_IN_FLIGHT));
        let mut stops = Vec::with_capacity(n);
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            let stop = Arc::new(Stop::default());
            stops.push(stop.clone());
            let name = format!("{prefix}-{i}");
            let issued = ca.issue(
                drover_proto::identity::Role::Agent,
                &name,
                &[],
                droverctl::certs::VALID_FOR_DEFAULT,
            )?;
            let tls = TlsMaterial::from_pem(
                ca_pem.clone(),
                issued.cert_pem.into_bytes(),
                issued.key_pem.into_bytes(),
            );
            let sim = Sim {
                name,
                addrs: addrs.clone(),
                tls,
                stats: stats.clone(),
                stop,
                noop_ms,
                first: i % addrs.len(),
                connecting: connecting.clone(),
            };
            tasks.push(tokio::spawn(sim.run()));
        }
        Ok(Fleet {
            stats,
            stops,
            tasks,
        })
    }

    /// Stops one simulated agent abruptly (as if its host died): its session just ends.
    pub fn kill(&self, i: usize) {
        self.stops[i].set();
    }

    pub async fn stop(self) {
        for s in &self.stops {
            s.set();
        }
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
    }
}

struct Sim {
    name: String,
    addrs: Arc<Vec<String>>,
    tls: TlsMaterial,
    stats: Arc<FleetStats>,
    stop: Arc<Stop>,
    noop_ms: u64,
    first: usize,
    connecting: Arc<Semaphore>,
}

impl Sim {
    async fn run(self) {
        let mut next: Option<String> = None;
        let mut index = self.first;
        let mut connected_once = false;
        while !self.stop.is_set() {
            let addr = next.take().unwrap_or_else(|| {
                index += 1;
                self.addrs[index % self.addrs.len()].clone()
            });
            if connected_once {
                self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
            }
            match self.session(&addr, &mut connected_once).await {
                Some(leader) => next = Some(leader),
                None => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Runs one session; returns the leader to follow, if told.
    async fn session(&self, addr: &str, connected_once: &mut bool) -> Option<String> {
        // Held until the leader answers the registration (or the attempt fails).
        let mut connecting = Some(self.connecting.acquire().await.ok()?);
        let channel = connect(addr, &self.tls).await.ok()?;
        let (tx, rx) = mpsc::channel(256);
        let register = pb::Register {
            name: self.name.clone(),
            resources: Some(pb::Resources {
                cpu_millis: 4_000,
                memory_bytes: 8 << 30,
                ..Default::default()
            }),
            class: "default".into(),
            pool: "sim".into(),
            version: "sim".into(),
            ..Default::default()
        };
        tx.send(pb::AgentMessage {
            msg: Some(In::Register(register)),
        })
        .await
        .ok()?;
        let mut inbound = match AgentServiceClient::new(channel)
            .session(ReceiverStream::new(rx))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(status) => return leader_hint(&status),
        };
        let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
        loop {
            if self.stop.is_set() {
                return None;
            }
            tokio::select! {
                _ = self.stop.wake.notified() => return None,
                msg = inbound.message() => {
                    let msg = match msg {
                        Ok(Some(m)) => m,
                        Ok(None) => return None,
                        Err(status) => return leader_hint(&status),
                    };
                    match msg.msg {
                        Some(Out::Registered(r)) => {
                            drop(connecting.take());
                            if !*connected_once {
                                self.stats.registered.fetch_add(1, Ordering::Relaxed);
                                *connected_once = true;
                            }
                            heartbeat = tokio::time::interval(Duration::from_millis(r.heartbeat_interval_ms.max(100)));
                        }
                        Some(Out::Assign(a)) => {
                            self.stats.assignments.fetch_add(1, Ordering::Relaxed);
                            let tx = tx.clone();
                            let delay = self.noop_ms;
                            let started_at_us = crate::unix_us();
                            tokio::spawn(async move {
                                if delay > 0 {
                                    tokio::time::sleep(Duration::from_millis(delay)).await;
                                }
                                let done = pb::TaskFinished {
                                    task_id: a.task_id,
                                    attempt: a.attempt,
                                    outcome: Some(pb::TaskOutcome { succeeded: true, exit_code: Some(0), duration_ms: delay, ..Default::default() }),
                                    started_at_us,
                                };
                                let _ = tx.send(pb::AgentMessage { msg: Some(In::Finished(done)) }).await;
                            });
                        }
                        _ => {}
                    }
                }
                _ = heartbeat.tick() => {
                    if tx.send(pb::AgentMessage { msg: Some(In::Heartbeat(pb::Heartbeat {})) }).await.is_err() {
                        return None;
                    }
                }
            }
        }
    }
}
