//! Raft peer traffic over the coordinators' own mTLS gRPC port. openraft's messages travel as
//! JSON inside an opaque `RaftPayload`, so the consensus library's types stay out of the public
//! contract.

use drover_proto::pb::RaftPayload;
use drover_proto::pb::raft_service_client::RaftServiceClient;
use drover_proto::tls::TlsMaterial;
use openraft::BasicNode;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::Channel;

use super::TypeConfig;
use crate::model::NodeId;

pub struct NetworkFactory {
    pub tls: TlsMaterial,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        PeerClient {
            target,
            addr: node.addr.clone(),
            tls: self.tls.clone(),
            client: None,
        }
    }
}

/// One peer; connects lazily and reconnects after a transport failure.
pub struct PeerClient {
    target: NodeId,
    addr: String,
    tls: TlsMaterial,
    client: Option<RaftServiceClient<Channel>>,
}

#[derive(Clone, Copy)]
enum Rpc {
    Append,
    Vote,
    Snapshot,
}

impl PeerClient {
    async fn call<Req, Resp, E>(
        &mut self,
        rpc: Rpc,
        req: &Req,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
        Result<Resp, E>: DeserializeOwned,
    {
        let data =
            super::codec::encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        if self.client.is_none() {
            let channel = drover_proto::client::connect(&self.addr, &self.tls)
                .await
                .map_err(|e| RPCError::Unreachable(Unreachable::new(&std::io::Error::other(e))))?;
            self.client = Some(
                RaftServiceClient::new(channel)
                    .max_decoding_message_size(drover_proto::GRPC_MESSAGE_BYTES_MAX * 8)
                    .max_encoding_message_size(drover_proto::GRPC_MESSAGE_BYTES_MAX * 8),
            );
        }
        let client = self.client.as_mut().expect("set above");
        let payload = RaftPayload { data };
        let result = match rpc {
            Rpc::Append => client.append_entries(payload).await,
            Rpc::Vote => client.vote(payload).await,
            Rpc::Snapshot => client.install_snapshot(payload).await,
        };
        let resp = match result {
            Ok(r) => r.into_inner(),
            Err(status) => {
                self.client = None;
                let err = std::io::Error::other(drover_proto::client::describe_status(&status));
                return Err(if status.code() == tonic::Code::Unavailable {
                    RPCError::Unreachable(Unreachable::new(&err))
                } else {
                    RPCError::Network(NetworkError::new(&err))
                });
            }
        };
        let decoded: Result<Resp, E> = super::codec::decode(&resp.data)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        decoded.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Rpc::Append, &rpc).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(Rpc::Snapshot, &rpc).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Rpc::Vote, &rpc).await
    }
}
