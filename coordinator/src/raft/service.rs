//! The receiving side of Raft peer traffic. Only certificates with the coordinator role may call.

use drover_proto::identity::{Role, require_role};
use drover_proto::pb::RaftPayload;
use drover_proto::pb::raft_service_server::RaftService;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::{Request, Response, Status};

use super::Raft;

pub struct RaftRpc {
    pub raft: Raft,
    /// Touched on every append and snapshot chunk from a leader (see `watchdog`).
    pub contact: std::sync::Arc<super::watchdog::LeaderContact>,
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
}
