//! Accepting gRPC connections. The coordinator runs the TLS handshakes itself rather than leave
//! them to tonic, which runs every accepted connection's handshake as a task of its own: when a
//! fleet of thousands of agents (re)connects together, thousands of handshakes become ready to
//! compute on the two runtime threads, and Raft's appends and the sessions' heartbeat reads queue
//! behind them (followers campaign; live agents go unheard for a lease).
//!
//! Here every handshake still has its own task, but a step of one (one poll: parsing a flight,
//! signing, verifying the client's chain) runs only with one of a few permits. A handshake
//! waiting for its client holds no permit, so a client that stalls mid-handshake delays nobody,
//! and at most `TLS_HANDSHAKE_STEPS_AT_ONCE` handshake steps are ever queued to run.

use std::future::{Future, poll_fn};
use std::sync::Arc;
use std::task::Poll;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

use crate::limits;
use crate::metrics::{Metrics, ResultLabels};

pub type Conn = tokio_rustls::server::TlsStream<TcpStream>;

/// Accepts on `listener` and yields connections whose handshake (client certificate verified)
/// has completed, until `shutdown` changes.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> (ReceiverStream<std::io::Result<Conn>>, JoinHandle<()>) {
    let (ready_tx, ready_rx) = mpsc::channel(limits::TLS_HANDSHAKE_STEPS_AT_ONCE);
    let acceptor = TlsAcceptor::from(config);
    let steps = Arc::new(Semaphore::new(limits::TLS_HANDSHAKE_STEPS_AT_ONCE));
    let pending = Arc::new(Semaphore::new(limits::TLS_HANDSHAKES_PENDING_MAX));
    let per_ip = Arc::new(PerIp::default());
    let task = tokio::spawn(async move {
        loop {
            // Past the bound, connections wait in the kernel's listen backlog.
            let slot = tokio::select! {
                _ = shutdown.changed() => return,
                slot = pending.clone().acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => return,
                },
            };
            let accepted = tokio::select! {
                _ = shutdown.changed() => return,
                accepted = listener.accept() => accepted,
            };
            let tcp = match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of descriptors, usually: pause rather than spin on the error.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(ip_slot) = per_ip.take(&tcp) else {
                metrics
                    .tls_handshakes
                    .get_or_create(&ResultLabels {
                        result: "refused_per_ip",
                    })
                    .inc();
                continue;
            };
            // Without it, Nagle plus delayed ACKs stall small Raft and session messages by tens
            // of milliseconds.
            let _ = tcp.set_nodelay(true);
            let (acceptor, steps, ready, metrics) = (
                acceptor.clone(),
                steps.clone(),
                ready_tx.clone(),
                metrics.clone(),
            );
            tokio::spawn(async move {
                let peer = tcp.peer_addr().ok();
                metrics.tls_handshakes_pending.inc();
                let outcome = tokio::time::timeout(
                    limits::TLS_HANDSHAKE_WAIT,
                    stepwise(acceptor.accept(tcp), &steps),
                )
                .await;
                metrics.tls_handshakes_pending.dec();
                drop(slot);
                drop(ip_slot);
                let result = match outcome {
                    Ok(Ok(conn)) => {
                        let _ = ready.send(Ok(conn)).await;
                        "ok"
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(?peer, error = %e, "TLS handshake failed");
                        "failed"
                    }
                    Err(_) => {
                        tracing::debug!(?peer, "TLS handshake timed out");
                        "timeout"
                    }
                };
                metrics
                    .tls_handshakes
                    .get_or_create(&ResultLabels { result })
                    .inc();
            });
        }
    });
    (ReceiverStream::new(ready_rx), task)
}

/// Handshakes in progress per client IP address.
#[derive(Default)]
struct PerIp(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

/// One handshake counted against its IP until dropped.
struct IpSlot {
    per_ip: Arc<PerIp>,
    ip: std::net::IpAddr,
}

impl PerIp {
    /// Counts a handshake from `tcp`'s peer, or None (close it) if that peer has its fill.
    fn take(self: &Arc<Self>, tcp: &TcpStream) -> Option<IpSlot> {
        let ip = tcp.peer_addr().ok()?.ip();
        let mut map = self.0.lock().unwrap();
        let n = map.entry(ip).or_default();
        if *n >= limits::TLS_HANDSHAKES_PER_IP_MAX {
            tracing::debug!(%ip, limit = limits::TLS_HANDSHAKES_PER_IP_MAX, "too many handshakes from one address; connection closed");
            return None;
        }
        *n += 1;
        Some(IpSlot {
            per_ip: self.clone(),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = self.per_ip.0.lock().unwrap();
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Drives `fut` to completion, polling it only while holding one of `steps`' permits, and
/// releasing the permit whenever it waits.
async fn stepwise<F: Future>(fut: F, steps: &Semaphore) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    loop {
        let permit = steps.acquire().await;
        // One poll; its waker is this task's, so the wake-up it arranges ends the wait below.
        let polled = poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await;
        drop(permit);
        if let Poll::Ready(out) = polled {
            return out;
        }
        let mut waited = false;
        poll_fn(|_| {
            if waited {
                Poll::Ready(())
            } else {
                waited = true;
                Poll::Pending
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_waiting_step_holds_no_permit_and_steps_never_exceed_the_bound() {
        // Two "handshakes" on one permit: the first waits for its peer (a oneshot) after its
        // first step; the second must complete meanwhile, so waiting holds no permit.
        let steps = Arc::new(Semaphore::new(1));
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let first = {
            let steps = steps.clone();
            tokio::spawn(async move { stepwise(async { rx.await.unwrap() + 1 }, &steps).await })
        };
        tokio::task::yield_now().await;
        let second = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            stepwise(async { 7 }, &steps),
        )
        .await
        .expect("a handshake waiting for its peer must not hold the permit");
        assert_eq!(second, 7);
        // While a step holds the only permit, no other step starts.
        let held = steps.clone().acquire_owned().await.unwrap();
        tx.send(41).unwrap();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!first.is_finished(), "a step ran without a permit");
        drop(held);
        let out = tokio::time::timeout(std::time::Duration::from_secs(5), first)
            .await
            .expect("woken by its peer, the first handshake finishes once a permit is free")
            .unwrap();
        assert_eq!(out, 42);
    }
}
