//! The core's errors. Each has a stable machine-readable [`Error::code`] that every API
//! surface passes on (problem+json `code`, WebSocket `error.code`, XMPP condition mapping).

use crate::model::Offset;

/// Everything the core can refuse or fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The node does not exist.
    #[error("node {0} does not exist")]
    NodeNotFound(String),
    /// The account does not exist.
    #[error("account {0} does not exist")]
    AccountNotFound(String),
    /// A username that breaks the rules.
    #[error("invalid username {0}")]
    InvalidUsername(String),
    /// The item does not exist.
    #[error("item {0} does not exist")]
    ItemNotFound(String),
    /// A node name that breaks the naming rules.
    #[error("invalid node name {0}")]
    InvalidNodeName(String),
    /// An item id that breaks the rules.
    #[error("invalid item id {0}")]
    InvalidItemId(String),
    /// A node configuration value out of range.
    #[error("invalid node configuration: {0}")]
    InvalidConfig(String),
    /// A payload that is not what it claims to be.
    #[error("invalid payload: {0}")]
    InvalidPayload(String),
    /// A payload over the configured limit.
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The payload's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// An epoch that is not 16 hex digits.
    #[error("invalid epoch {0:?}")]
    InvalidEpoch(String),
    /// The epoch named is not the node's current one.
    #[error("epoch {given} is not the node's current epoch {current}")]
    EpochMismatch {
        /// What the client sent.
        given: String,
        /// What the node has.
        current: String,
    },
    /// A position beyond the end of the node's history.
    #[error("offset {after} is beyond the node's last offset {last}")]
    OffsetOutOfRange {
        /// What the client asked for.
        after: Offset,
        /// The node's last offset.
        last: Offset,
    },
    /// The principal may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// An idempotency key that breaks the rules.
    #[error("invalid idempotency key: {0}")]
    InvalidIdempotencyKey(String),
    /// A subscriber fell further behind than its queue holds, under the `disconnect` policy.
    #[error(
        "subscriber fell too far behind and was disconnected; resubscribe with the last offset"
    )]
    SlowConsumer,
    /// The node's history changed epoch under a live subscription: the engine lost events it
    /// had acknowledged (a failover, or a restore from an older snapshot) and the node got a
    /// new epoch rather than giving those offsets to other items. The subscription ends;
    /// resuming with the last position says what can be recovered.
    #[error(
        "the node's history changed epoch ({old} to {new}): the engine lost events it had \
         acknowledged; resubscribe with your last position to see what was recovered"
    )]
    EpochChanged {
        /// The epoch the subscription followed.
        old: String,
        /// The node's epoch now.
        new: String,
    },
    /// The store cannot take writes now (engine down, shutting down, over capacity).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The shared engine (Redis) is unreachable, so a change could not be stored or its
    /// fan-out to the other instances is not running: nothing was acknowledged.
    #[error("engine unavailable: {0}")]
    EngineUnavailable(String),
    /// The store failed.
    #[error("storage error: {0}")]
    Storage(String),
}

impl Error {
    /// The stable code of this error, in snake case.
    pub fn code(&self) -> &'static str {
        match self {
            Error::NodeNotFound(_) => "node_not_found",
            Error::ItemNotFound(_) => "item_not_found",
            Error::AccountNotFound(_) => "account_not_found",
            Error::InvalidUsername(_) => "invalid_username",
            Error::InvalidNodeName(_) => "invalid_node_name",
            Error::InvalidItemId(_) => "invalid_item_id",
            Error::InvalidConfig(_) => "invalid_config",
            Error::InvalidPayload(_) => "invalid_payload",
            Error::PayloadTooLarge { .. } => "payload_too_large",
            Error::InvalidEpoch(_) => "invalid_epoch",
            Error::EpochMismatch { .. } => "epoch_mismatch",
            Error::OffsetOutOfRange { .. } => "offset_out_of_range",
            Error::Forbidden(_) => "forbidden",
            Error::InvalidIdempotencyKey(_) => "invalid_idempotency_key",
            Error::SlowConsumer => "slow_consumer",
            Error::EpochChanged { .. } => "epoch_changed",
            Error::Unavailable(_) => "unavailable",
            Error::EngineUnavailable(_) => "engine_unavailable",
            Error::Storage(_) => "storage_error",
        }
    }

    /// True when the fault is the caller's (a 4xx), false for server-side failures.
    pub fn is_client_error(&self) -> bool {
        !matches!(
            self,
            Error::Unavailable(_) | Error::EngineUnavailable(_) | Error::Storage(_)
        )
    }
}

impl From<redb::Error> for Error {
    fn from(e: redb::Error) -> Self {
        Error::Storage(e.to_string())
    }
}

macro_rules! storage_from {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::Storage(e.to_string())
            }
        }
    )*};
}
storage_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);
