//! Drover's wire contract: the generated gRPC types and services, plus the few helpers every
//! side needs to speak it (TLS identities, roles read from certificates, leader-following client).

#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("drover.v1");
}

pub mod client;
pub mod config_file;
pub mod identity;
pub mod quantity;
pub mod selector;
pub mod tls;

/// gRPC metadata key carrying the leader's address on a FAILED_PRECONDITION "not leader" answer.
pub const LEADER_ADDR_METADATA: &str = "drover-leader-addr";

/// Largest gRPC message any side sends or accepts (4 MiB of logs plus framing; a run spec is far
/// smaller). Shared so both ends agree.
pub const GRPC_MESSAGE_BYTES_MAX: usize = 8 * 1024 * 1024;
