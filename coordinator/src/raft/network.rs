//! Raft peer traffic over the coordinators' own mTLS gRPC port. openraft's messages travel
//! encoded by `codec` inside an opaque `RaftPayload`, so the consensus library's types stay out of
//! the public contract. A snapshot goes in chunks (`SnapshotChunk`), each within the gRPC message
//! limit, and the follower installs it once the last one has arrived (see `service`).

use std::future::Future;

use drover_proto::pb::RaftPayload;
use drover_proto::pb::raft_service_client::RaftServiceClient;
use drover_proto::tls::TlsMaterial;
use openraft::BasicNode;
use openraft::error::{
    NetworkError, RPCError, RaftError, ReplicationClosed, StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::{SnapshotMetaOf, SnapshotOf};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;

use super::{SnapshotData, TypeConfig, Vote};
use crate::limits;
use crate::model::NodeId;

pub struct NetworkFactory {
    pub tls: TlsMaterial,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, _target: NodeId, node: &BasicNode) -> PeerClient {
        PeerClient {
            addr: node.addr.clone(),
            tls: self.tls.clone(),
            client: None,
        }
    }
}

/// One piece of a snapshot on its way to a follower. Every chunk carries the sender's vote and
/// the snapshot's meta, so the follower can tell a new transfer from the rest of the current one.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotChunk {
    pub vote: Vote,
    pub meta: SnapshotMetaOf<TypeConfig>,
    /// Where `data` starts in the snapshot's bytes.
    pub offset: u64,
    #[serde(with = "super::codec::bytes")]
    pub data: Vec<u8>,
    /// The last chunk: install the snapshot.
    pub done: bool,
}

/// The follower's answer to a chunk: its vote once the last chunk is installed, else nothing
/// yet; or why it refused the chunk.
pub type SnapshotChunkReply = Result<Option<SnapshotResponse<TypeConfig>>, String>;

/// One peer; connects lazily and reconnects after a transport failure.
pub struct PeerClient {
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

type PeerError = RPCError<TypeConfig>;

impl PeerClient {
    /// Sends `req` and decodes the answer. A peer whose Raft has stopped counts as unreachable.
    async fn call<Req, Resp>(&mut self, rpc: Rpc, req: &Req) -> Result<Resp, PeerError>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
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
        super::codec::decode(&resp.data).map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }

    /// For the RPCs the peer's Raft answers itself: its only error is that it has stopped.
    async fn call_raft<Req, Resp>(&mut self, rpc: Rpc, req: &Req) -> Result<Resp, PeerError>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        let answer: Result<Resp, RaftError<TypeConfig>> = self.call(rpc, req).await?;
        answer.map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))
    }

    /// Sends one chunk, giving up after `RAFT_INSTALL_SNAPSHOT_WAIT_MS`.
    async fn send_chunk(
        &mut self,
        chunk: &SnapshotChunk,
    ) -> Result<Option<SnapshotResponse<TypeConfig>>, StreamingError<TypeConfig>> {
        let wait = std::time::Duration::from_millis(limits::RAFT_INSTALL_SNAPSHOT_WAIT_MS);
        let reply: SnapshotChunkReply =
            match tokio::time::timeout(wait, self.call(Rpc::Snapshot, chunk)).await {
                Ok(r) => r.map_err(streaming)?,
                Err(_) => {
                    self.client = None;
                    return Err(StreamingError::Network(NetworkError::from_string(format!(
                        "snapshot chunk at offset {} not answered within {wait:?}",
                        chunk.offset
                    ))));
                }
            };
        reply.map_err(|why| StreamingError::Network(NetworkError::from_string(why)))
    }
}

fn streaming(e: PeerError) -> StreamingError<TypeConfig> {
    match e {
        RPCError::Timeout(e) => StreamingError::Timeout(e),
        RPCError::Unreachable(e) => StreamingError::Unreachable(e),
        RPCError::Network(e) => StreamingError::Network(e),
        RPCError::RemoteError(e) => match e.source {},
    }
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, PeerError> {
        self.call_raft(Rpc::Append, &rpc).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, PeerError> {
        self.call_raft(Rpc::Vote, &rpc).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: SnapshotOf<TypeConfig, SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let bytes = snapshot.snapshot.into_inner();
        let send_all = async {
            let mut offset = 0;
            loop {
                let end = bytes.len().min(offset + limits::RAFT_SNAPSHOT_CHUNK_BYTES);
                let chunk = SnapshotChunk {
                    vote,
                    meta: snapshot.meta.clone(),
                    offset: offset as u64,
                    data: bytes[offset..end].to_vec(),
                    done: end == bytes.len(),
                };
                match self.send_chunk(&chunk).await? {
                    Some(installed) => return Ok(installed),
                    None if chunk.done => {
                        return Err(StreamingError::Network(NetworkError::from_string(
                            "the follower did not install the snapshot after its last chunk",
                        )));
                    }
                    None => offset = end,
                }
            }
        };
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            sent = send_all => sent,
        }
    }
}
