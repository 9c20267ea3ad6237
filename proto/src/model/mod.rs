//! Plain Rust model types and their conversions to and from Cap'n Proto.
//!
//! [`Msg`] is every message, owned. Hot paths that must not copy (the server
//! reading a million file entries) can instead parse a frame with
//! [`crate::frame::parse`] and walk a batch with [`list_batch_entries`],
//! which yields borrowed [`EntryRef`]s.
//!
//! - `types`: the parts of messages (results, ops, plans, progress, ...);
//! - `entry`: file list entries, owned and borrowed;
//! - `classification`: which files take part, and its conversion to and from
//!   `fleetsync_select::Classification`;
//! - `msg`: the [`Msg`] enum and its entry points;
//! - `encode` / `decode`: the message body conversions, with the list helpers
//!   `wire` gives them.

/// Gives a model enum `to_schema` / `from_schema`, converting to and from the
/// schema enum whose variants have the same names.
macro_rules! schema_enum_conversions {
    ($model:ident <-> $schema:ty { $($variant:ident),+ $(,)? }) => {
        impl $model {
            pub(crate) fn to_schema(self) -> $schema {
                type S = $schema;
                match self {
                    $($model::$variant => S::$variant,)+
                }
            }
            pub(crate) fn from_schema(value: $schema) -> Self {
                type S = $schema;
                match value {
                    $(S::$variant => $model::$variant,)+
                }
            }
        }
    };
}

mod classification;
mod decode;
mod encode;
mod entry;
mod msg;
mod types;
mod wire;

pub use classification::{ClassificationSpec, FilterRule, Selector};
pub use entry::{list_batch_entries, EntryRef, FileEntry, FileKind};
pub use msg::{encode_file_chunk, Msg};
pub use types::{
    Action, Attrs, BasisFound, BasisItem, BlockDef, ChecksumResult, Coding, Done, ExpectedFile,
    Failure, InconsistentFile, ItemResult, Op, OpKind, Outcome, PlanItem, Progress, RelayNode,
    RemoteResult, Role, SyncProgress, SyncRequest, TransferOptions, TreeIdentity, Version,
};
