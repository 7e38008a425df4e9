//! Errors the coordinator's inner code returns, and the one place they become gRPC statuses.

use drover_proto::LEADER_ADDR_METADATA;
use tonic::Status;

#[derive(Debug, Clone, thiserror::Error)]
pub enum CoordinatorError {
    #[error("this node is not the leader")]
    NotLeader { leader_addr: Option<String> },
    #[error("no leader is elected right now; retry shortly")]
    NoLeader,
    #[error("{message}")]
    LimitReached { limit: String, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    #[error("{0}")]
    Rejected(String),
    #[error(
        "the write's outcome is unknown (timed out or leadership changed); retry with the same idempotency key: {0}"
    )]
    Unknown(String),
    #[error("coordinator is shutting down")]
    ShuttingDown,
    /// Answerable elsewhere or later, for the reason given.
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl CoordinatorError {
    /// Whether the same request may succeed if made again on this node a little later.
    pub fn may_pass(&self) -> bool {
        matches!(
            self,
            CoordinatorError::NotLeader { leader_addr: None }
                | CoordinatorError::NoLeader
                | CoordinatorError::LimitReached { .. }
                | CoordinatorError::Unknown(_)
        )
    }

    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        CoordinatorError::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl From<CoordinatorError> for Status {
    fn from(err: CoordinatorError) -> Status {
        let text = err.to_string();
        match err {
            CoordinatorError::NotLeader { leader_addr } => match leader_addr {
                Some(addr) => {
                    let mut status = Status::failed_precondition(format!(
                        "not the leader; the leader is {addr}"
                    ));
                    if let Ok(v) = addr.parse() {
                        status.metadata_mut().insert(LEADER_ADDR_METADATA, v);
                    }
                    status
                }
                None => Status::unavailable("no leader is elected right now; retry shortly"),
            },
            CoordinatorError::NoLeader
            | CoordinatorError::ShuttingDown
            | CoordinatorError::Unknown(_)
            | CoordinatorError::Unavailable(_) => Status::unavailable(text),
            CoordinatorError::LimitReached { .. } => Status::resource_exhausted(text),
            CoordinatorError::NotFound(_) => Status::not_found(text),
            CoordinatorError::InvalidArgument { .. } => Status::invalid_argument(text),
            CoordinatorError::Rejected(_) => Status::failed_precondition(text),
            CoordinatorError::Internal(_) => Status::internal(text),
        }
    }
}
