//! The receiving side of Raft peer traffic. Only certificates with the coordinator role may call.

use std::task::{Context, Poll};

use drover_proto::identity::{Role, cached_identity, require_role};
use drover_proto::pb::raft_service_server::RaftService;
use drover_proto::pb::{LeaderProbeReply, LeaderProbeRequest, RaftPayload};
use openraft::async_runtime::WatchReceiver;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Request, Response, Status};

use super::network::{SnapshotChunk, SnapshotChunkReply};
use super::{Raft, Vote};
use crate::limits;

pub struct RaftRpc {
    raft: Raft,
    /// Touched on every append and snapshot chunk from a leader (see `watchdog`).
    contact: std::sync::Arc<super::watchdog::LeaderContact>,
    /// The snapshot being received, if any (one at a time).
    receiving: tokio::sync::Mutex<Option<Receiving>>,
}

/// A snapshot partly received: whose, which, and the bytes so far.
#[derive(Debug)]
struct Receiving {
    vote: Vote,
    meta: openraft::type_config::alias::SnapshotMetaOf<super::TypeConfig>,
    bytes: Vec<u8>,
}

/// Adds `chunk` to the transfer in `receiving`; returns the whole snapshot after its last chunk.
/// A first chunk starts a new transfer (dropping any other); any other chunk must continue the
/// current one exactly, or the leader is told to start over. A transfer past `max_bytes` is
/// dropped.
fn accept_chunk(
    receiving: &mut Option<Receiving>,
    chunk: SnapshotChunk,
    max_bytes: u64,
) -> Result<Option<Receiving>, String> {
    if chunk.offset == 0 {
        *receiving = Some(Receiving {
            vote: chunk.vote,
            meta: chunk.meta.clone(),
            bytes: Vec::new(),
        });
    }
    let Some(current) = receiving.as_mut() else {
        return Err(format!(
            "snapshot chunk at offset {} without its transfer's first chunk; start over",
            chunk.offset
        ));
    };
    if current.vote != chunk.vote
        || current.meta != chunk.meta
        || current.bytes.len() as u64 != chunk.offset
    {
        return Err(format!(
            "snapshot chunk at offset {} does not continue the transfer under way (at {} bytes); \
             start over",
            chunk.offset,
            current.bytes.len()
        ));
    }
    if chunk.offset + chunk.data.len() as u64 > max_bytes {
        *receiving = None;
        return Err(format!(
            "snapshot larger than raft_snapshot_receive_bytes_max ({max_bytes} bytes)"
        ));
    }
    current.bytes.extend_from_slice(&chunk.data);
    Ok(if chunk.done { receiving.take() } else { None })
}

impl RaftRpc {
    pub fn new(raft: Raft, contact: std::sync::Arc<super::watchdog::LeaderContact>) -> Self {
        Self {
            raft,
            contact,
            receiving: Default::default(),
        }
    }

    /// Adds `chunk` to the snapshot being received; installs the snapshot after its last chunk.
    async fn receive_chunk(&self, chunk: SnapshotChunk) -> SnapshotChunkReply {
        let complete = {
            let mut receiving = self.receiving.lock().await;
            accept_chunk(
                &mut receiving,
                chunk,
                limits::RAFT_SNAPSHOT_RECEIVE_BYTES_MAX,
            )?
        };
        let Some(Receiving { vote, meta, bytes }) = complete else {
            return Ok(None);
        };
        let snapshot = openraft::Snapshot {
            meta,
            snapshot: std::io::Cursor::new(bytes),
        };
        self.raft
            .install_full_snapshot(vote, snapshot)
            .await
            .map(Some)
            .map_err(|e| format!("installing the snapshot: {e}"))
    }
}

/// Notes an append or a snapshot chunk from a fellow coordinator as soon as its request starts
/// to arrive, before its body is read. openraft gives an append as long as the Raft heartbeat
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
        let chunk = decode(&req)?;
        // A leader sending a snapshot is alive, however long the snapshot takes.
        self.contact.heard_from_leader();
        let reply = self.receive_chunk(chunk).await;
        self.contact.heard_from_leader();
        encode(&reply)
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
            let m = m.borrow_watched();
            (m.state == openraft::ServerState::Leader, m.current_term)
        };
        Ok(Response::new(LeaderProbeReply { leading, term }))
    }
}

#[cfg(test)]
mod tests {
    use super::{Receiving, SnapshotChunk, accept_chunk, is_leader_traffic};
    use crate::raft::{Vote, log_id};

    fn chunk(term: u64, index: u64, offset: u64, data: &[u8], done: bool) -> SnapshotChunk {
        SnapshotChunk {
            vote: Vote::new_committed(term, 1),
            meta: openraft::SnapshotMeta {
                last_log_id: Some(log_id(term, 1, index)),
                last_membership: Default::default(),
            },
            offset,
            data: data.to_vec(),
            done,
        }
    }

    #[test]
    fn a_snapshot_is_taken_in_only_in_order_from_one_leader_and_within_its_limit() {
        let mut receiving: Option<Receiving> = None;
        let mut take = |c| accept_chunk(&mut receiving, c, 10);
        assert!(
            take(chunk(2, 9, 3, b"def", false)).is_err(),
            "no transfer has begun"
        );
        assert!(take(chunk(2, 9, 0, b"abc", false)).unwrap().is_none());
        assert!(take(chunk(2, 9, 4, b"ef", false)).is_err(), "a gap");
        assert!(take(chunk(3, 9, 3, b"def", false)).is_err(), "another vote");
        assert!(
            take(chunk(2, 8, 3, b"def", false)).is_err(),
            "another snapshot"
        );
        let whole = take(chunk(2, 9, 3, b"def", true))
            .unwrap()
            .expect("complete");
        assert_eq!(whole.bytes, b"abcdef");
        assert_eq!(whole.meta.last_log_id, Some(log_id(2, 1, 9)));
        assert!(
            take(chunk(2, 9, 6, b"g", true)).is_err(),
            "a finished transfer takes nothing more"
        );
        // A new first chunk replaces a transfer under way.
        take(chunk(2, 9, 0, b"abc", false)).unwrap();
        take(chunk(3, 12, 0, b"xy", false)).unwrap();
        let whole = take(chunk(3, 12, 2, b"z", true))
            .unwrap()
            .expect("complete");
        assert_eq!(whole.bytes, b"xyz");
        // Past the limit: refused by name, and the transfer dropped.
        take(chunk(3, 12, 0, b"0123456", false)).unwrap();
        let err = take(chunk(3, 12, 7, b"7890", true)).unwrap_err();
        assert!(err.contains("raft_snapshot_receive_bytes_max"), "{err}");
        assert!(take(chunk(3, 12, 7, b"789", true)).is_err());
    }

    #[test]
    fn only_appends_and_snapshot_chunks_count_as_a_leader_heard() {
        assert!(is_leader_traffic("/drover.v1.RaftService/AppendEntries"));
        assert!(is_leader_traffic("/drover.v1.RaftService/InstallSnapshot"));
        assert!(!is_leader_traffic("/drover.v1.RaftService/Vote"));
        assert!(!is_leader_traffic("/drover.v1.ClientService/AppendEntries"));
        assert!(!is_leader_traffic("/drover.v1.AgentService/Session"));
    }
}
