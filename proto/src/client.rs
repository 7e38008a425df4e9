//! A client for a coordinator cluster that finds and follows the leader.
//!
//! Any node answers reads. A follower answers a write with FAILED_PRECONDITION and the leader's
//! address in the `drover-leader-addr` metadata; during an election nodes answer UNAVAILABLE.
//! [`ClusterClient::call`] hides both: it follows redirects and retries UNAVAILABLE with
//! exponential backoff until its deadline. A write that timed out is "unknown", not "failed":
//! callers pass an idempotency key so the retry cannot create a second run.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::pb::client_service_client::ClientServiceClient;
use crate::tls::TlsMaterial;
use crate::{GRPC_MESSAGE_BYTES_MAX, LEADER_ADDR_METADATA};

/// How long one TCP + TLS connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a single RPC may take before it is abandoned (and, for writes, retried).
pub const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// Retry pauses while no leader answers: short enough that a client notices the new leader within
/// ~200 ms of its election (elections take 0.6-1.2 s), cheap because "no leader" answers are tiny.
const BACKOFF_FIRST: Duration = Duration::from_millis(10);
// Short: an election takes a few hundred milliseconds, and a longer pause only adds to it.
const BACKOFF_MAX: Duration = Duration::from_millis(100);
/// Redirects followed in one call; more means the cluster disagrees about its leader.
const REDIRECTS_MAX: u32 = 8;

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No coordinator could be reached at all.
    #[error("cannot reach any coordinator (tried {tried}): {detail}")]
    Unreachable { tried: String, detail: String },
    /// The server answered with an error status.
    #[error("{}", describe_status(.0))]
    Status(Status),
}

impl CallError {
    pub fn code(&self) -> Code {
        match self {
            CallError::Unreachable { .. } => Code::Unavailable,
            CallError::Status(s) => s.code(),
        }
    }
}

/// The leader address carried by a "not leader" answer, if any.
pub fn leader_hint(status: &Status) -> Option<String> {
    if status.code() != Code::FailedPrecondition {
        return None;
    }
    status
        .metadata()
        .get(LEADER_ADDR_METADATA)
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// One line for a person: the status code, its message, and the innermost transport cause
/// (which is where a TLS handshake failure shows up).
pub fn describe_status(status: &Status) -> String {
    let mut cause = String::new();
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(err) = source {
        cause = err.to_string();
        source = err.source();
    }
    let code = format!("{:?}", status.code());
    let msg = status.message();
    if cause.is_empty() || msg.contains(&cause) {
        format!("{code}: {msg}")
    } else {
        format!("{code}: {msg}: {cause}")
    }
}

/// Renders a connection error as one line, naming a TLS handshake failure as such.
pub fn describe_transport_error(addr: &str, err: &tonic::transport::Error) -> String {
    let mut chain = vec![err.to_string()];
    let mut source = std::error::Error::source(err);
    while let Some(e) = source {
        chain.push(e.to_string());
        source = e.source();
    }
    let inner = chain.last().cloned().unwrap_or_default();
    let lower = chain.join(" ").to_lowercase();
    if lower.contains("certificate")
        || lower.contains("tls")
        || lower.contains("alert")
        || lower.contains("handshake")
    {
        format!(
            "TLS handshake with {addr} failed: {inner} (do --tls-dir / DROVER_TLS_DIR hold certificates from this cluster's CA?)"
        )
    } else {
        format!("connecting to {addr} failed: {inner}")
    }
}

/// Opens an mTLS channel to one coordinator, eagerly, so handshake failures surface here.
pub async fn connect(addr: &str, tls: &TlsMaterial) -> Result<Channel, String> {
    let bad_addr = |e: String| format!("bad coordinator address '{addr}': {e}");
    // The TLS is ours (see `CoordinatorOnly`), so tonic dials plain `http` through it.
    let endpoint =
        Endpoint::from_shared(format!("http://{addr}")).map_err(|e| bad_addr(e.to_string()))?;
    let host = endpoint.uri().host().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let server_name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| bad_addr(e.to_string()))?;
    let connector = TlsConnector {
        config: tls
            .coordinator_client_config()
            .map_err(|e| format!("TLS identity: {e}"))?,
        server_name,
    };
    let endpoint = endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(RPC_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| describe_transport_error(addr, &e))
}

/// TCP, then a TLS handshake with our client config, for tonic's channel (which reconnects
/// through it as well).
#[derive(Clone)]
struct TlsConnector {
    config: std::sync::Arc<rustls::ClientConfig>,
    server_name: rustls::pki_types::ServerName<'static>,
}

type Connected = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

impl tower_service::Service<tonic::transport::Uri> for TlsConnector {
    type Response = Connected;
    type Error = std::io::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Connected, std::io::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: tonic::transport::Uri) -> Self::Future {
        let config = self.config.clone();
        let name = self.server_name.clone();
        Box::pin(async move {
            let host = uri.host().unwrap_or_default();
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(80);
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

/// A leader-following client for the ClientService.
pub struct ClusterClient {
    addrs: Vec<String>,
    tls: TlsMaterial,
    current: Mutex<Option<(String, Channel)>>,
    /// How long [`ClusterClient::call`] keeps retrying UNAVAILABLE and unreachable nodes.
    pub retry_deadline: Duration,
}

impl ClusterClient {
    pub fn new(addrs: Vec<String>, tls: TlsMaterial) -> Self {
        Self {
            addrs,
            tls,
            current: Mutex::new(None),
            retry_deadline: Duration::from_secs(20),
        }
    }

    /// Address of the node the client is talking to now, if connected.
    pub fn current_addr(&self) -> Option<String> {
        self.current
            .lock()
            .unwrap()
            .as_ref()
            .map(|(a, _)| a.clone())
    }

    async fn channel_to(&self, addr: &str) -> Result<Channel, String> {
        if let Some((a, ch)) = self.current.lock().unwrap().as_ref()
            && a == addr
        {
            return Ok(ch.clone());
        }
        let ch = connect(addr, &self.tls).await?;
        *self.current.lock().unwrap() = Some((addr.to_owned(), ch.clone()));
        Ok(ch)
    }

    /// Any reachable node, starting with the current one.
    async fn any_channel(&self, start: usize) -> Result<(String, Channel), CallError> {
        if let Some(cur) = self.current.lock().unwrap().clone() {
            return Ok(cur);
        }
        let mut errors = Vec::new();
        for i in 0..self.addrs.len() {
            let addr = &self.addrs[(start + i) % self.addrs.len()];
            match self.channel_to(addr).await {
                Ok(ch) => return Ok((addr.clone(), ch)),
                Err(e) => errors.push(e),
            }
        }
        Err(CallError::Unreachable {
            tried: self.addrs.join(","),
            detail: errors.join("; "),
        })
    }

    fn forget(&self, addr: &str) {
        let mut cur = self.current.lock().unwrap();
        if cur.as_ref().is_some_and(|(a, _)| a == addr) {
            *cur = None;
        }
    }

    /// Runs `f` against the cluster, following leader redirects and retrying UNAVAILABLE (and
    /// unreachable nodes) with backoff until `retry_deadline`.
    pub async fn call<R, F, Fut>(&self, mut f: F) -> Result<R, CallError>
    where
        F: FnMut(ClientServiceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, Status>>,
    {
        let deadline = Instant::now() + self.retry_deadline;
        let mut backoff = BACKOFF_FIRST;
        let mut redirects = 0;
        let mut start = 0usize;
        loop {
            let (addr, channel) = match self.any_channel(start).await {
                Ok(c) => c,
                Err(e) => {
                    // A TLS refusal will not fix itself; only retry plain unreachability.
                    if e.to_string().contains("TLS handshake")
                        || Instant::now() + backoff > deadline
                    {
                        return Err(e);
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            let client = ClientServiceClient::new(channel)
                .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX);
            let status = match f(client).await {
                Ok(resp) => return Ok(resp.into_inner()),
                Err(status) => status,
            };
            let status = if let Some(leader) = leader_hint(&status) {
                if leader == addr {
                    status
                } else {
                    match self.channel_to(&leader).await {
                        Ok(_) => {
                            redirects += 1;
                            if redirects > REDIRECTS_MAX {
                                return Err(CallError::Status(status));
                            }
                            continue;
                        }
                        Err(e) => {
                            // The named leader is gone; an election will follow. Treat as UNAVAILABLE.
                            self.forget(&leader);
                            self.forget(&addr);
                            start += 1;
                            Status::unavailable(format!(
                                "the last known leader {leader} is unreachable ({e}); waiting for an election"
                            ))
                        }
                    }
                }
            } else if status.code() != Code::Unavailable && !is_connection_failure(&status) {
                return Err(CallError::Status(status));
            } else {
                // No leader yet, or the node went away: try the next node after a pause.
                self.forget(&addr);
                start += 1;
                status
            };
            if Instant::now() + backoff > deadline {
                return Err(CallError::Status(status));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

/// tonic reports a connection that broke mid-call (peer killed, TLS EOF) as UNKNOWN "transport
/// error"; like UNAVAILABLE it says nothing about the request, so it is retried on another node.
/// (Writes stay safe: they carry an idempotency key.)
fn is_connection_failure(status: &Status) -> bool {
    // CANCELLED reaches a caller that did not cancel only when the connection closed under the
    // call ("operation was canceled: connection closed", e.g. the leader was killed mid-request).
    status.code() == Code::Cancelled
        || (status.code() == Code::Unknown
            && (status.message().starts_with("transport error")
                || std::error::Error::source(status).is_some()))
}

#[cfg(test)]
mod retry_tests {
    use super::*;

    #[test]
    fn a_connection_closing_under_a_call_is_retried_and_refusals_are_not() {
        assert!(is_connection_failure(&Status::cancelled(
            "operation was canceled: connection closed"
        )));
        assert!(is_connection_failure(&Status::unknown(
            "transport error: broken pipe"
        )));
        assert!(!is_connection_failure(&Status::invalid_argument("spec")));
        assert!(!is_connection_failure(&Status::unknown("something else")));
    }
}
