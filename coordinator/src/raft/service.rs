//! The receiving side of Raft peer traffic. Only certificates with the coordinator role may call.

use std::task::{Context, Poll};

use drover_proto::identity::{Role, cached_identity, require_role};
use drover_proto::pb::raft_service_server::RaftService;
use drover_proto::pb::{LeaderProbeReply, LeaderProbeRequest, RaftPayload};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Request, Response, Status};

use super::Raft;

pub struct RaftRpc {
    pub raft: Raft,
    /// Touched on every append and snapshot chunk from a leader (see `watchdog`).
    pub contact: std::sync::Arc<super::watchdog::LeaderContact>,
}

/// Notes an append or a snapshot chunk from a fellow coordinator as soon as its request starts
/// to arrive, before its body is read. openraft 0.9 gives an append as long as the Raft heartbeat
/// interval (50 ms) and then cancels it and sends it again; under load a large one takes longer
/// than that to transfer (a 1.5M-task run logged 90-180 such timeouts per node). Were that to go
/// on for a lease, a follower counting only the appends that reached its handler would campaign
/// against a leader that had been sending all along.
#[derive(Clone)]
pub struct HeardOnArrival<S> {
    pub inner: S,
    pub contact: std::sync::Arc<super::watchdog::LeaderContact>,
}

impl<S: NamedService> NamedService for HeardOnArrival<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for HeardOnArrival<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if is_leader_traffic(req.uri().path()) && from_coordinator(&req) {
            self.contact.heard_from_leader();
        }
        self.inner.call(req)
    }
}

/// Appends (heartbeats included) and snapshot chunks come only from a leader; votes do not.
fn is_leader_traffic(path: &str) -> bool {
    let Some(method) = path.strip_prefix("/drover.v1.RaftService/") else {
        return false;
    };
    matches!(method, "AppendEntries" | "InstallSnapshot")
}

/// Only a coordinator's certificate may hold off elections (the handler checks it again).
fn from_coordinator<B>(req: &http::Request<B>) -> bool {
    req.extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|info| info.peer_certs())
        .and_then(|certs| {
            let leaf = certs.first()?;
            cached_identity(leaf.as_ref()).ok()
        })
        .is_some_and(|id| id.role == Role::Coordinator)
}

fn decode<T: DeserializeOwned>(req: &Request<RaftPayload>) -> Result<T, Status> {
    super::codec::decode(&req.get_ref().data)
        .map_err(|e| Status::invalid_argument(format!("undecodable raft message: {e}")))
}

fn encode<T: Serialize>(value: &T) -> Result<Response<RaftPayload>, Status> {
    let data = super::codec::encode(value)
        .map_err(|e| Status::internal(format!("encoding raft reply: {e}")))?;
    Ok(Response::new(RaftPayload { data }))
}

#[tonic::async_trait]
impl RaftService for RaftRpc {
    #[tracing::instrument(level = "trace", skip_all)]
    async fn append_entries(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        require_role(&req, "raft append_entries", &[Role::Coordinator])?;
        let rpc = decode(&req)?;
        // On arrival and again when stored: a large append can take a while. (An append from a
        // deposed leader counts too; it steps down on the refusal, so that lasts one round trip.)
        self.contact.heard_from_leader();
        let resp = self.raft.append_entries(rpc).await;
        self.contact.heard_from_leader();
        encode(&resp)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        require_role(&req, "raft vote", &[Role::Coordinator])?;
        let rpc = decode(&req)?;
        encode(&self.raft.vote(rpc).await)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn install_snapshot(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        require_role(&req, "raft install_snapshot", &[Role::Coordinator])?;
        let rpc = decode(&req)?;
        // A leader sending a snapshot is alive, however long the snapshot takes.
        self.contact.heard_from_leader();
        let resp = self.raft.install_snapshot(rpc).await;
        self.contact.heard_from_leader();
        encode(&resp)
    }

    /// Answered from Raft's published state, never through its core: the core may be the very
    /// thing that is busy.
    #[tracing::instrument(level = "debug", skip_all)]
    async fn leader_probe(
        &self,
        req: Request<LeaderProbeRequest>,
    ) -> Result<Response<LeaderProbeReply>, Status> {
        require_role(&req, "raft leader_probe", &[Role::Coordinator])?;
        let (leading, term) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            (m.state == openraft::ServerState::Leader, m.current_term)
        };
        Ok(Response::new(LeaderProbeReply { leading, term }))
    }
}

#[cfg(test)]
mod tests {
    use super::is_leader_traffic;

    #[test]
    fn only_appends_and_snapshot_chunks_count_as_a_leader_heard() {
        assert!(is_leader_traffic("/drover.v1.RaftService/AppendEntries"));
        assert!(is_leader_traffic("/drover.v1.RaftService/InstallSnapshot"));
        assert!(!is_leader_traffic("/drover.v1.RaftService/Vote"));
        assert!(!is_leader_traffic("/drover.v1.ClientService/AppendEntries"));
        assert!(!is_leader_traffic("/drover.v1.AgentService/Session"));
    }
}
